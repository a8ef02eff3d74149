"""kohya's --vae_slices for diffusers' AutoencoderKL: the VAE's encoder and decoder run in horizontal bands of rows,
so that no full-size intermediate beyond the few each layer's input and output need exists at once.

Why: a VAE decoding a large image holds several full-resolution activations at a time (in the 1024x1024 decode of
the SD VAE a 256-channel 1024x1024 fp32 tensor is 1 GiB, and a ResNet block keeps its input, its normalised copy and
its activation at once). Computed band by band, a layer holds only its input and output whole (a ResNet block also
its inner activation), plus one band of the rest: docs/benchmarks.md has the memory saved. Where
the VAE sits on an accelerator, the whole tensors are kept in host memory between layers and only one band at a
time is on the device, as kohya's library/slicing_vae.py does: that is where the VRAM goes.

What is exact: every layer of the VAE is computed as diffusers computes it, on the same values:
- a convolution (and the nearest-neighbour upsampling or zero-padded stride-2 downsampling before it) is run by its
  own module on the band plus the halo rows its receptive field reaches (1 input row each side for a 3x3 kernel);
  the output rows the band owns see exactly the inputs they see in the whole tensor, real neighbours inside the
  image and the module's own zero padding at its top and bottom edge (rows computed against a band's cut edge are
  dropped);
- GroupNorm statistics are gathered over the whole tensor before any band is normalised (a first pass over the
  bands: per-band means and variances, combined exactly), so each band is normalised with the statistics of the
  whole image; normalising each band with its own statistics (what a naive split does) changes the image;
- the mid-block self-attention, at latent resolution, runs whole (every position attends to all others).
What is not bit-identical: float rounding. The GroupNorm statistics are summed in another order than torch's kernel
(and applied as x * scale + shift per channel, the form torch's kernel uses; in fp32 for half-precision
activations, as torch does), and a convolution over a band may be tiled by the backend differently than over the
whole tensor. Measured against diffusers' plain forward on the tiny SD 1.x / SDXL VAEs (tests/test_vae_row_slicing.py,
which states the bounds): in fp64 1.8e-14 of the output's magnitude (so the scheme itself is exact), in fp32 1.0e-5
with 1 band as with 12 (the statistics' rounding, amplified by the random tiny VAE); a gen_img image comes out
pixel-equal (img2img: 1 level at most). Per-band GroupNorm statistics, or convolutions without their halo rows, move
the decode by 0.9 .. 1.3 of its magnitude.

Inference only: the passes run under no_grad and write bands into their own tensors in place.

How it differs from kohya's: kohya's (a modified copy of an older diffusers VAE with SD 1.x's sizes written into it)
is of the same kind as far as read: halo rows around each band's convolutions, GroupNorms and the mid-block attention
on whole tensors (the norms on the CPU), whole tensors in host memory. It cuts the full-resolution layers into N
bands and the deeper ones into fewer (N/8 at latent resolution, none below 2), and leaves the decoder's first
convolution and the encoder's last layers whole. Here every layer's output rows are cut into the same N nearly equal
bands (the deep layers are small, so this costs a little time, no memory), using the VAE's own modules (any
AutoencoderKL built from diffusers' ResNet and up- / down-sampling blocks: SD 1.x, 2.x, SDXL), and the statistics are
gathered band by band, so no whole normalised copy exists either. kohya's code was not run here (it imports diffusers
modules that have moved since). N must not exceed the latent rows (every band at least one latent row):
`check_slices`.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

FLAG = "--vae_slices"


def check_slices(num_slices: int, latent_rows: int | None = None) -> None:
    """ValueError naming the flag unless 1 <= num_slices <= latent_rows (each band holds one latent row or more;
    None: the rows are not known yet)."""
    if num_slices < 1:
        raise ValueError(f"{FLAG} {num_slices}: give the number of horizontal bands the VAE works in (1 or more)")
    if latent_rows is not None and num_slices > latent_rows:
        raise ValueError(f"{FLAG} {num_slices}: more bands than the image's {latent_rows} latent rows (each band "
                         f"holds one latent row or more); use at most {latent_rows} or a taller image")


def enable(vae, num_slices: int) -> None:
    """Make `vae` (diffusers' AutoencoderKL) encode and decode in `num_slices` bands of rows from now on, wherever it
    is called (our decode, the pipelines' own encode and decode). ValueError naming the flag if the VAE has a layer
    this cannot cut into bands, or num_slices < 1."""
    check_slices(num_slices)
    _check_supported(vae.encoder, vae.decoder)
    vae.encoder.forward = types.MethodType(lambda encoder, x: _encode(encoder, x, num_slices), vae.encoder)
    vae.decoder.forward = types.MethodType(
        lambda decoder, z, latent_embeds=None: _decode(decoder, z, num_slices, latent_embeds), vae.decoder)


def disable(vae) -> None:
    """Back to diffusers' own forward passes."""
    for part in (vae.encoder, vae.decoder):
        part.__dict__.pop("forward", None)


@contextlib.contextmanager
def row_sliced(vae, num_slices: int):
    """`enable` for the duration of the block, then `disable`."""
    enable(vae, num_slices)
    try:
        yield vae
    finally:
        disable(vae)


# ----------------------------------------------------------------------------------------------------------------
# What can be cut into bands: checked once, before any image is made.

def _check_supported(encoder, decoder) -> None:
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    def fail(what: str):
        return ValueError(f"{FLAG}: this VAE's {what} cannot be computed in bands of rows here (diffusers' "
                          f"AutoencoderKL of SD 1.x / 2.x / SDXL can); run without {FLAG}")

    def conv(name: str, module, stride: int = 1, padding: int | None = None):
        ok = isinstance(module, nn.Conv2d) and module.stride == (stride, stride) and module.dilation == (1, 1) and \
            module.padding == ((module.kernel_size[0] // 2,) * 2 if padding is None else (padding, padding)) and \
            module.kernel_size[0] == module.kernel_size[1] and module.kernel_size[0] % 2 == 1
        if not ok:
            raise fail(f"{name} ({module.__class__.__name__})")

    def norm(name: str, module):
        if type(module) is not nn.GroupNorm:
            raise fail(f"{name} ({module.__class__.__name__}, not a GroupNorm)")

    def resnet(name: str, block):
        if not isinstance(block, ResnetBlock2D) or block.upsample is not None or block.downsample is not None or \
                block.time_emb_proj is not None or block.time_embedding_norm == "scale_shift":
            raise fail(f"{name} ({block.__class__.__name__})")
        norm(f"{name}.norm1", block.norm1)
        norm(f"{name}.norm2", block.norm2)
        conv(f"{name}.conv1", block.conv1)
        conv(f"{name}.conv2", block.conv2)
        if block.conv_shortcut is not None:
            conv(f"{name}.conv_shortcut", block.conv_shortcut)

    def mid(name: str, block):
        if not hasattr(block, "attentions") or len(block.resnets) != len(block.attentions) + 1:
            raise fail(f"{name} ({block.__class__.__name__})")
        for i, r in enumerate(block.resnets):
            resnet(f"{name}.resnets.{i}", r)

    for part, blocks, sampler in ((encoder, "down_blocks", "downsamplers"), (decoder, "up_blocks", "upsamplers")):
        where = "encoder" if part is encoder else "decoder"
        conv(f"{where}.conv_in", part.conv_in)
        mid(f"{where}.mid_block", part.mid_block)
        norm(f"{where}.conv_norm_out", part.conv_norm_out)
        conv(f"{where}.conv_out", part.conv_out)
        for b, block in enumerate(getattr(part, blocks)):
            if set(dict(block.named_children())) - {"resnets", sampler}:
                raise fail(f"{where}.{blocks}.{b} ({block.__class__.__name__})")
            for i, r in enumerate(block.resnets):
                resnet(f"{where}.{blocks}.{b}.resnets.{i}", r)
            for i, s in enumerate(getattr(block, sampler) or []):
                name = f"{where}.{blocks}.{b}.{sampler}.{i}"
                if isinstance(s, Upsample2D):
                    if s.norm is not None or s.use_conv_transpose or not s.interpolate or not s.use_conv:
                        raise fail(name)
                    conv(f"{name}.conv", s.conv)
                elif isinstance(s, Downsample2D):
                    # SD's VAE pads one zero row and column at the bottom and right, then convolves (3x3, stride 2)
                    if s.norm is not None or not s.use_conv or s.padding != 0:
                        raise fail(name)
                    conv(f"{name}.conv", s.conv, stride=2, padding=0)
                else:
                    raise fail(f"{name} ({s.__class__.__name__})")


# ----------------------------------------------------------------------------------------------------------------
# The banded forward passes: the same layers in the same order as diffusers' Encoder / Decoder.forward.

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """GroupNorm statistics of half-precision activations in fp32 (torch's kernels do the same), fp64 in fp64."""
    return torch.promote_types(dtype, torch.float32)


def _on_own_tensor(activation):
    """The activation applied to a band this pass has just made (a normalised band): SiLU in place, saving a copy
    of the band (the same values); any other activation as it is."""
    if type(activation) is nn.SiLU:
        return lambda t: torch.nn.functional.silu(t, inplace=True)
    return activation


class _Bands:
    """Where whole tensors live (`store`: host memory when computing on an accelerator) and where bands are
    computed (`device`), and how many bands each layer's output rows are cut into."""

    def __init__(self, num_slices: int, device: torch.device):
        self.n, self.device = num_slices, device
        self.store = torch.device("cpu") if device.type != "cpu" else device

    def of(self, rows: int) -> list[tuple[int, int]]:
        """`rows` cut into n nearly equal bands [a, b)."""
        if rows < self.n:
            raise ValueError(f"{FLAG} {self.n}: a layer of the VAE has only {rows} rows here (the image's latent "
                             f"rows bound the number of bands); use at most {rows}")
        return [(i * rows // self.n, (i + 1) * rows // self.n) for i in range(self.n)]

    def map(self, x: torch.Tensor, rows_out: int, need, first_row, fn, residual=None, into=None) -> torch.Tensor:
        """A row-local layer band by band: for each band [a, b) of the `rows_out` output rows, `fn` runs on the
        input rows `need(a, b)` (clipped to the tensor: the layer's own padding applies at the image's edges), whose
        first output row is `first_row(lo)`; the band's rows are kept (plus `residual(a, b, rows)` when given), in
        a new tensor or in `into`."""
        out = into
        for a, b in self.of(rows_out):
            lo, hi = need(a, b)
            lo, hi = max(lo, 0), min(hi, x.shape[2])
            y = fn(x[:, :, lo:hi].to(self.device))
            start = a - first_row(lo)
            y = y[:, :, start:start + b - a]
            if residual is not None:
                y = residual(a, b, y)
            if out is None:
                out = torch.empty((y.shape[0], y.shape[1], rows_out, y.shape[3]), dtype=y.dtype, device=self.store)
            out[:, :, a:b] = y
        return out

    def conv(self, x: torch.Tensor, conv: nn.Conv2d, before=None, residual=None, into=None) -> torch.Tensor:
        """A stride-1 convolution (after the row-wise `before`, e.g. norm and activation) band by band."""
        halo = conv.kernel_size[0] // 2
        return self.map(x, x.shape[2], lambda a, b: (a - halo, b + halo), lambda lo: lo,
                        (lambda t: conv(before(t))) if before is not None else conv, residual, into)

    def group_stats(self, x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1/std of each (image, group) over the whole tensor, gathered band by band: each band's mean and
        variance, combined by Chan et al.'s pairwise rule in float64 (exact up to rounding, unlike per-band stats)."""
        groups, acc = norm.num_groups, _accumulation_dtype(x.dtype)
        count, mean, m2 = 0, None, None
        for a, b in self.of(x.shape[2]):
            band = x[:, :, a:b].to(self.device, acc).unflatten(1, (groups, -1))  # a view: no copy of the band
            var_b, mean_b = torch.var_mean(band, dim=(2, 3, 4), correction=0)
            k = band[0, 0].numel()
            var_b, mean_b = var_b.cpu().double(), mean_b.cpu().double()
            if mean is None:
                count, mean, m2 = k, mean_b, var_b * k
                continue
            delta, total = mean_b - mean, count + k
            mean = mean + delta * (k / total)
            m2 = m2 + var_b * k + delta * delta * (count * k / total)
            count = total
        rstd = (m2 / count + norm.eps).rsqrt()
        return mean.to(self.device, acc), rstd.to(self.device, acc)

    def normalise(self, x: torch.Tensor, norm: nn.GroupNorm):
        """The GroupNorm as a per-channel x * scale + shift with the whole tensor's statistics (torch's kernel
        applies it in that form too), computed in fp32 (fp64 for fp64) and returned in the band's dtype."""
        mean, rstd = self.group_stats(x, norm)
        acc, per_group = mean.dtype, x.shape[1] // norm.num_groups
        scale = rstd.repeat_interleave(per_group, dim=1)
        mean = mean.repeat_interleave(per_group, dim=1)
        if norm.affine:
            scale = scale * norm.weight.to(acc)
        shift = (norm.bias.to(acc) if norm.affine else 0.0) - mean * scale
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        return lambda t: torch.addcmul(shift, t.to(acc), scale).to(t.dtype)

    def resnet(self, x: torch.Tensor, block) -> torch.Tensor:
        """diffusers' ResnetBlock2D (no time embedding): conv1(act(norm1(x))), conv2(dropout(act(norm2(.)))), plus
        the shortcut of x, over the output scale. The output overwrites x's rows band by band when the shapes
        allow (a band's residual reads only its own rows of x, and x is this pass's own tensor)."""
        norm1, act = self.normalise(x, block.norm1), _on_own_tensor(block.nonlinearity)
        h = self.conv(x, block.conv1, before=lambda t: act(norm1(t)))
        norm2 = self.normalise(h, block.norm2)
        shortcut = block.conv_shortcut

        def residual(a, b, y):
            rows = x[:, :, a:b].to(self.device)
            return ((shortcut(rows) if shortcut is not None else rows) + y) / block.output_scale_factor

        return self.conv(h, block.conv2, before=lambda t: block.dropout(act(norm2(t))),
                         residual=residual, into=x if shortcut is None else None)

    def mid(self, x: torch.Tensor, block) -> torch.Tensor:
        x = self.resnet(x, block.resnets[0])
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            if attention is not None:  # at latent resolution, whole: every position attends to every other
                x = attention(x.to(self.device), temb=None).to(self.store)
            x = self.resnet(x, resnet)
        return x

    def upsample(self, x: torch.Tensor, upsampler) -> torch.Tensor:
        """Nearest x2 then a 3x3 convolution: output row r reads upsampled rows r-1..r+1, input rows
        (r-1)//2 .. (r+1)//2."""
        return self.map(x, 2 * x.shape[2], lambda a, b: ((a - 1) // 2, b // 2 + 1), lambda lo: 2 * lo, upsampler)

    def downsample(self, x: torch.Tensor, downsampler) -> torch.Tensor:
        """One zero row padded at the bottom, then a 3x3 stride-2 convolution: output row j reads rows 2j..2j+2
        (the padding row is the module's own at the image's bottom edge, and never read inside)."""
        return self.map(x, x.shape[2] // 2, lambda a, b: (2 * a, 2 * b + 1), lambda lo: lo // 2, downsampler)

    def tail(self, x: torch.Tensor, part) -> torch.Tensor:
        norm, act = self.normalise(x, part.conv_norm_out), _on_own_tensor(part.conv_act)
        return self.conv(x, part.conv_out, before=lambda t: act(norm(t)))


@torch.no_grad()  # inference only (gen_img): bands are written in place, so nothing could flow back through them
def _decode(decoder, z: torch.Tensor, num_slices: int, latent_embeds=None) -> torch.Tensor:
    if latent_embeds is not None:
        raise ValueError(f"{FLAG}: a decoder with spatial norms (latent embeddings) is not supported")
    bands = _Bands(num_slices, z.device)
    x = bands.conv(z.to(bands.store), decoder.conv_in)
    x = bands.mid(x, decoder.mid_block)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = bands.resnet(x, resnet)
        for upsampler in block.upsamplers or []:
            x = bands.upsample(x, upsampler)
    return bands.tail(x, decoder).to(z.device)


@torch.no_grad()
def _encode(encoder, x: torch.Tensor, num_slices: int) -> torch.Tensor:
    bands = _Bands(num_slices, x.device)
    h = bands.conv(x.to(bands.store), encoder.conv_in)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = bands.resnet(h, resnet)
        for downsampler in block.downsamplers or []:
            h = bands.downsample(h, downsampler)
    h = bands.mid(h, encoder.mid_block)
    return bands.tail(h, encoder).to(x.device)
