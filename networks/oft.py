"""OFT, orthogonal finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), as kohya's `--network_module
networks.oft`: each targeted U-Net layer's weight W [out, in(, kh, kw)] is turned by a block-diagonal rotation of its
output rows, W' = Rᵀ W with R = diag(R_1 .. R_k), so the angles between neurons, what the paper argues carries the
pretrained knowledge, are kept. `--network_dim` is the number of blocks k (each block covers out / k rows);
`--network_alpha` is the constraint.

Each block is parameterised as in kohya: `oft_blocks` B [k, n, n] (zero at the start: R = I, the network changes
nothing), Q = B - Bᵀ (skew-symmetric), its Frobenius norm over all blocks clamped to alpha * out (kohya's
constraint; the paper's is alpha * out², kohya keeps out for backward compatibility), and R_i the Cayley transform
(I + Q_i)(I - Q_i)⁻¹, orthogonal for any skew-symmetric Q_i. The multiplier m blends: m (R - I) + I. The bias is
not rotated.

Targets, as kohya's: the attention projections (to_q, to_k, to_v, to_out.0) of the U-Net's transformer blocks;
`enable_all_linear=True`: every Linear and 1x1 conv of the transformer blocks (proj_in / proj_out, the
feed-forward); `enable_conv=True`: also the ResNet blocks and down/upsamplers. The U-Net only: kohya's OFT has no
text-encoder modules.

Files hold, per module, `<name>.oft_blocks` [k, n, n] and `<name>.alpha`, with kohya's names: `oft_unet_` + the
diffusers module path for SD 1.x / 2.x (`oft_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`),
the original layout for SDXL (`oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`). What reads them:
- AUTOMATIC1111's WebUI (1.7+) maps `oft_unet_` to its own `diffusion_model_` names and computes the same W' (same
  constraint, same multiplier blend): SDXL files load; SD 1.x / 2.x files do not, since WebUI looks the diffusers
  names up in the original layout.
- ComfyUI and LyCORIS look for `lora_unet_` / `lycoris_` names only, so they skip kohya's OFT files.
networks/convert_oft.py writes the same rotations under LyCORIS' names (`lora_unet_*.oft_blocks`), which ComfyUI and
WebUI read for every family; and every reader can use a model with the OFT merged into it (gen_img.py
--network_merge, or a checkpoint written after merging).

Where this differs from kohya's networks/oft.py, and why:
- network args are parsed as booleans (true / false / 1 / 0 / yes / no): kohya's bool("False") is True;
- network_alpha <= 0 is refused: kohya clamps the rotation to nothing then (constraint 0), while WebUI and LyCORIS
  read alpha 0 as "no constraint", so the file would mean two things;
- a layer whose width the block count does not divide is refused by name (kohya fails inside einops);
- a file's modules are rebuilt one by one (block count and alpha each), not from its first tensor.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from networks import lora
from networks.lora import (_NO_FORWARD, AdapterNetwork, NetworkModule, family_mismatch_hint, read_weights,
                           unet_targets)
from library.textual_inversion import bundled_words, split_bundled

logger = logging.getLogger(__name__)

FILE_LAYOUT = "oft"
PREFIX_UNET = "oft_unet"
# kohya's targets, by class: its U-Net's CrossAttention is diffusers' Attention.
ATTENTION_CONTAINERS = ("Attention", "CrossAttention")
TRANSFORMER_CONTAINERS = ("Transformer2DModel",)
CONV_CONTAINERS = lora.UNET_CONV_CONTAINERS
ARG_KEYS = ("enable_all_linear", "enable_conv")
DEFAULT_ALPHA = 1e-3  # kohya's, when no --network_alpha reaches create_network


class OFTModule(NetworkModule):
    """A block-diagonal rotation of one layer's output rows."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, num_blocks: int = 4,
                 alpha: float = DEFAULT_ALPHA):
        super().__init__(lora_name, org_module, multiplier)
        lora._check_wrappable(lora_name, org_module, "OFT")
        out = org_module.out_channels if isinstance(org_module, nn.Conv2d) else org_module.out_features
        if num_blocks < 1 or out % num_blocks:
            raise ValueError(f"{lora_name}: OFT splits this layer's {out} outputs into --network_dim {num_blocks} "
                             f"blocks of equal size, and {num_blocks} does not divide {out}; give a block count that "
                             "divides the width of every targeted layer (e.g. a power of two)")
        self.num_blocks, self.block_size, self.out_dim = num_blocks, out // num_blocks, out
        self.oft_blocks = nn.Parameter(torch.zeros(num_blocks, self.block_size, self.block_size))
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self._constraint = float(alpha) * out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._constraint = float(self.alpha) * self.out_dim  # a loaded alpha is the constraint from now on

    @property
    def constraint(self) -> float:
        """The largest Frobenius norm of Q (all blocks together): alpha * out; 0 (a file's alpha 0) means none."""
        return self._constraint

    def skew(self) -> torch.Tensor:
        """Q = B - Bᵀ per block (fp32), scaled down to the constraint where it is larger."""
        blocks = self.oft_blocks.float()
        q = blocks - blocks.transpose(1, 2)
        if self._constraint > 0:
            # Where the norm is within the constraint the factor is a constant 1 (no gradient through the norm,
            # and none of 0 / 0 at the start, when Q is zero).
            q = q * (self._constraint / q.norm().clamp(min=self._constraint))
        return q

    def rotation(self) -> torch.Tensor:
        """R per block [k, n, n], fp32: the Cayley transform of Q, orthogonal."""
        with torch.autocast(self.oft_blocks.device.type, enabled=False):  # a solve in half precision loses R's
            q = self.skew()                                                  # orthogonality
            eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
            # (I + Q)(I - Q)⁻¹ = (I - Q)⁻¹(I + Q): the two factors commute; a solve is better conditioned than an
            # explicit inverse.
            return torch.linalg.solve(eye - q, eye + q)

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Rᵀ W per block of output rows, with R blended by the multiplier: (m (R - I) + I)ᵀ W."""
        r = self.rotation()
        if self.multiplier != 1.0:
            eye = torch.eye(self.block_size, device=r.device, dtype=r.dtype)
            r = self.multiplier * (r - eye) + eye
        blocks = weight.to(r.dtype).reshape(self.num_blocks, self.block_size, -1)
        return torch.bmm(r.transpose(1, 2), blocks).reshape(weight.shape)

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        org = self.org_module
        if isinstance(org, nn.Conv2d):
            return org._conv_forward(x, weight, bias)  # the layer's own stride, padding and padding mode
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0 or not self.enabled:  # not enabled: merged into the layer (--network_pre_calc)
            return self._org_forward(x)
        org = self.org_module
        rotated = self.rotated_weight(org.weight)
        if self._saved_forward is _NO_FORWARD:
            # Nothing else wraps this layer: one pass with the rotated weight, as kohya computes it (and as a
            # merged model does).
            bias = org.bias.to(x.dtype) if org.bias is not None else None
            return self._layer(x, rotated.to(x.dtype), bias)
        # Another network already wraps the layer (gen_img.py with several networks): keep its output and add
        # what the rotation changes, so neither network is lost.
        out = self._org_forward(x)
        change = (rotated - org.weight.to(rotated.dtype)).to(x.dtype)
        return out + self._layer(x, change, None).to(out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.rotated_weight(weight)


class OFTNetwork(AdapterNetwork):
    """kohya's OFT network: U-Net modules only, prefix `oft_unet`."""

    UNET_PREFIX = PREFIX_UNET
    KIND = "OFT"

    def __init__(self, text_encoder, unet: nn.Module | None, *, multiplier: float = 1.0, dim: int = 4,
                 alpha: float = DEFAULT_ALPHA, enable_all_linear: bool = False, enable_conv: bool = False,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None):
        super().__init__(text_encoder, unet, multiplier=multiplier)
        if unet is None:
            raise ValueError("networks.oft adapts the U-Net (kohya's OFT has no text-encoder modules); give the U-Net")
        if modules_dim is not None:  # from a file: exactly its modules, wherever they are
            every = unet_targets(unet, conv=True, every_layer=True, prefix=PREFIX_UNET)
            unknown = sorted(set(modules_dim) - set(every))
            if unknown:
                hint = family_mismatch_hint(modules_dim, every) or "Is it an OFT for another base model family?"
                more = f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else ""
                raise ValueError(f"{len(unknown)} of {len(modules_dim)} OFT module(s) in the weights match no layer "
                                 f"of this U-Net. {hint} Unmatched: {', '.join(unknown[:12])}{more}")
            targets = {name: every[name] for name in modules_dim}
        else:
            containers = (TRANSFORMER_CONTAINERS if enable_all_linear else ATTENTION_CONTAINERS) + (
                CONV_CONTAINERS if enable_conv else ())
            targets = unet_targets(unet, conv=False, prefix=PREFIX_UNET, containers=containers)
        self.unet_loras = self._register([
            OFTModule(name, module, multiplier, modules_dim[name] if modules_dim else dim,
                      modules_alpha[name] if modules_dim else alpha) for name, module in targets.items()])
        logger.info("OFT: %d U-Net modules", len(self.unet_loras))

    @property
    def unet_ofts(self) -> list[OFTModule]:  # kohya's name for them
        return self.unet_loras

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        if not apply_unet:
            raise ValueError("networks.oft trains the U-Net only (kohya's OFT has no text-encoder modules), so it "
                             "cannot train the text encoder alone: leave out --network_train_text_encoder_only, or "
                             "use networks.lora")
        super().apply_to(text_encoder, unet, apply_text_encoder, apply_unet)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr: float | None, default_lr: float | None
                                 ) -> tuple[list[dict], list[str]]:
        """One group, "unet" (kohya's OFT has one), at unet_lr or else the default learning rate."""
        if not any(module.is_applied for module in self.loras):
            raise RuntimeError("prepare_optimizer_params: call apply_to() first")
        if any(text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]):
            logger.warning("networks.oft has no text-encoder modules: --text_encoder_lr %s has nothing to train",
                           text_encoder_lr)
        lr = default_lr if unet_lr is None else unet_lr
        self.requires_grad_(bool(lr))
        if not lr:
            logger.info("OFT: learning rate %s, not trained", lr)
            return [], []
        return [{"params": list(self.parameters()), "lr": lr}], ["unet"]


def _flag(name: str, value) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise ValueError(f"--network_args {name}={value!r}: expected True or False")


def _parse(kwargs: dict, neuron_dropout: float | None) -> dict[str, bool]:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if neuron_dropout is not None:
        raise ValueError(f"--network_dropout {neuron_dropout}: networks.oft has no dropout (kohya's neither); leave "
                         "it out")
    unknown = sorted(set(kwargs) - set(ARG_KEYS))
    if unknown:
        raise ValueError(f"--network_args: unknown key(s) for networks.oft: {', '.join(unknown)} "
                         f"(known: {', '.join(ARG_KEYS)})")
    return {key: _flag(key, kwargs[key]) for key in ARG_KEYS if key in kwargs}


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> OFTNetwork:
    """kohya's factory: --network_dim is the number of blocks (default 4), --network_alpha the constraint (kohya's
    default 1e-3 when none is given; kohya suggests values below 1)."""
    flags = _parse(kwargs, neuron_dropout)
    dim = 4 if network_dim is None else network_dim
    alpha = DEFAULT_ALPHA if network_alpha is None else network_alpha
    if not alpha > 0:
        raise ValueError(f"--network_alpha {alpha}: networks.oft reads network_alpha as the constraint on the "
                         "rotation (its norm is at most alpha * the layer's width); give a positive value such as "
                         "1e-3 (kohya's suggestion)")
    if alpha >= 1:
        logger.warning("--network_alpha %s: OFT's constraint is alpha * the layer's width; at >= 1 it hardly "
                       "constrains anything (kohya suggests e.g. 1e-3)", alpha)
    return OFTNetwork(text_encoder, unet, multiplier=multiplier, dim=dim, alpha=alpha, **flags)


def dims_from_weights(weights_sd: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module block count (oft_blocks' first dimension) and alpha; every key must be kohya's OFT layout."""
    names = {key.split(".", 1)[0] for key in weights_sd}
    odd = sorted(k for k in weights_sd if not (k.startswith(PREFIX_UNET + "_") and
                                               k.endswith((".oft_blocks", ".alpha")) and k.count(".") == 1))
    incomplete = sorted(n for n in names if f"{n}.oft_blocks" not in weights_sd or f"{n}.alpha" not in weights_sd)
    bad = sorted(f"{n}.oft_blocks {tuple(weights_sd[f'{n}.oft_blocks'].shape)}" for n in names
                 if f"{n}.oft_blocks" in weights_sd and (weights_sd[f"{n}.oft_blocks"].dim() != 3 or
                                                         weights_sd[f"{n}.oft_blocks"].shape[1] !=
                                                         weights_sd[f"{n}.oft_blocks"].shape[2]))
    problems = []
    if odd:
        problems.append(f"key(s) outside kohya's OFT layout (oft_unet_*.oft_blocks / .alpha): {', '.join(odd[:12])}"
                        + (" (a LoRA? use networks.lora)" if any("lora_" in k for k in odd) else ""))
    if incomplete:
        problems.append(f"module(s) without both oft_blocks and alpha: {', '.join(incomplete[:12])}")
    if bad:
        problems.append(f"oft_blocks must be [blocks, size, size]: {', '.join(bad[:12])}")
    if problems:
        raise ValueError("not a kohya OFT file: " + "; ".join(problems))
    names = sorted(names)
    return ({n: weights_sd[f"{n}.oft_blocks"].shape[0] for n in names},
            {n: float(weights_sd[f"{n}.alpha"].float()) for n in names})


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[OFTNetwork, dict[str, torch.Tensor]]:
    """A network shaped like an OFT file (its modules, each with its block count and alpha), weights not loaded."""
    _parse(kwargs, None)  # checked, though the file decides which layers are adapted
    if weights_sd is None:
        weights_sd = read_weights(file)
    weights_sd, bundled = split_bundled(weights_sd)
    if bundled:
        logger.info("%s carries embedding(s) %s (bundle_emb.*): not network weights, left out here", file or "OFT",
                    ", ".join(bundled_words(bundled)))
    dims, alphas = dims_from_weights(weights_sd)
    network = OFTNetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas)
    return network, weights_sd
