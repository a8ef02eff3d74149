"""DyLoRA (Valipour et al. 2022, https://arxiv.org/abs/2210.07558) by kohya's module name: `--network_module
networks.dylora --network_args unit=4`. One LoRA trained so that every truncation to a multiple of `unit` ranks is
itself a usable LoRA: rank 16 with unit 4 gives LoRAs of rank 4, 8, 12 and 16 from one run
(networks/extract_lora_from_dylora.py cuts them out).

Its files are plain kohya LoRA files at the full rank (`<name>.lora_down.weight` [r, in], `.lora_up.weight`
[out, r], `.alpha`), which WebUI, ComfyUI, diffusers and the LoRA tools load as any LoRA: ΔW = up @ down * alpha / r.
Modules, names (SDXL: original layout, `lora_te1` / `lora_te2`), saving, loading and merging are networks.lora's.

Training, per optimizer step: a rank b = k * unit is drawn (k uniform in 1 .. r / unit, one draw per step for the
whole network, from the run seed and the step, so resumed and multi-process runs draw the same), each module computes
with its first b ranks only, scaled by alpha / b, and only the b-th unit of ranks (rows b-unit .. b of down, the same
columns of up) receives gradients; the lower units are frozen for that step (the paper's "frozen" mode). So the
truncation to b is exactly the LoRA that step trained, and the one a LoRA file truncated to b ranks (alpha kept)
computes: extraction is exact. Outside training the network computes at its full rank (or at `set_rank`).

Where this differs from kohya's networks/dylora.py, and why:
- kohya's forward always uses all r ranks and scales them by alpha / r * sqrt(r / b); the paper (and its first
  author, kohya-ss/sd-scripts#394) use the first b ranks at alpha / b. With kohya's, a truncated file was never the
  network any step trained; with the paper's it is.
- kohya draws b per module and per forward from Python's global random generator; here one b per step from the run
  seed, as the paper does, so runs repeat and resume exactly.
- kohya's SDXL text-encoder modules lack the `lora_te1` / `lora_te2` prefixes (kohya-ss/sd-scripts#1158); here they
  have them, as networks.lora's.
- conv_alpha: kohya parses it but gives 3x3 convs network_alpha; here network_alpha is its default and a
  conv_alpha given is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from networks import lora
from networks.lora import LoRANetwork, NetworkModule, weight_delta


FILE_LAYOUT = "lora"  # plain kohya LoRA keys at the full rank
# kohya's dylora.py reads these keys (and `unit`); dropouts and block-wise options it has not.
ARG_KEYS = ("conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


class DyLoRAModule(NetworkModule):
    """A LoRA of rank r = n * unit kept as n units (each `unit` rows of down and columns of up, separate
    parameters, so a unit frozen for a step has no gradient and the optimizer leaves it untouched). Its state_dict
    is a LoRA module's: `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)], `alpha`."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, unit: int = 1):
        super().__init__(lora_name, org_module, multiplier)
        lora._check_wrappable(lora_name, org_module, "DyLoRA")
        self.lora_dim, self.unit = int(lora_dim), int(unit)
        if self.unit < 1 or self.lora_dim % self.unit:
            raise ValueError(f"{lora_name}: DyLoRA rank {self.lora_dim} is not a multiple of --network_args "
                             f"unit={self.unit}; give a rank (--network_dim) that unit divides")
        self.units = self.lora_dim // self.unit
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            down_shape = (self.lora_dim, org_module.in_channels, *org_module.kernel_size)
            up_shape = (org_module.out_channels, self.lora_dim, 1, 1)
        else:
            down_shape, up_shape = (self.lora_dim, org_module.in_features), (org_module.out_features, self.lora_dim)
        self._down_shape, self._up_shape = down_shape, up_shape
        # networks.lora's initialisation of the whole matrices (kaiming-uniform down, zero up), then cut into units.
        down = torch.empty(down_shape)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        for i, (d, u) in enumerate(zip(down.split(self.unit, 0), torch.zeros(up_shape).split(self.unit, 1))):
            self.register_parameter(f"lora_down_{i}", nn.Parameter(d.clone()))
            self.register_parameter(f"lora_up_{i}", nn.Parameter(u.clone()))
        # kohya: alpha 0 / None means alpha = rank. A buffer: it is in the file.
        self.register_buffer("alpha", torch.tensor(float(alpha or 0) or float(self.lora_dim), dtype=torch.float32))
        self._alpha = float(self.alpha)  # read by every forward; a tensor read would sync the GPU each time
        self.step_units: int | None = None  # the units the current training step uses (DyLoRANetwork.begin_step)
        self.eval_units = self.units  # outside training: the full rank unless DyLoRANetwork.set_rank says otherwise

    def _units(self, part: str) -> list[torch.Tensor]:
        return [getattr(self, f"lora_{part}_{i}") for i in range(self.units)]

    def factors(self, units: int | None = None, trained_unit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the first `units` units (all by default), shaped as in a LoRA file; with `trained_unit`,
        every other unit is detached (no gradient reaches it)."""
        units = self.units if units is None else units

        def pieces(part: str) -> list[torch.Tensor]:
            return [t if trained_unit is None or i == trained_unit else t.detach()
                    for i, t in enumerate(self._units(part)[:units])]

        return torch.cat(pieces("down"), 0), torch.cat(pieces("up"), 1)

    def down_parameters(self) -> list[torch.Tensor]:
        return self._units("down")

    def up_parameters(self) -> list[torch.Tensor]:
        return self._units("up")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if not self.enabled:  # merged into the layer for now (gen_img --network_pre_calc)
            return out
        if self.training:
            if self.step_units is None:
                raise RuntimeError(f"{self.lora_name}: a DyLoRA network trains at the rank drawn for each step; call "
                                   "its begin_step(seed) before the step's forward passes (train_network.py does), or "
                                   "put it in eval mode (network.eval()) to compute with it")
            units, trained = self.step_units, self.step_units - 1
        else:
            units, trained = self.eval_units, None
        down, up = self.factors(units, trained)
        x = x.to(down.dtype)  # see LoRAModule.forward: the branch computes in its own dtype
        if self.is_conv:
            org = self.org_module
            lx = F.conv2d(F.conv2d(x, down, None, org.stride, org.padding), up)
        else:
            lx = F.linear(F.linear(x, down), up)
        scale = self._alpha / (units * self.unit)
        # Rounded as LoRAModule rounds it, so a LoRA file of the first b ranks computes exactly this.
        return out + (lx * self.multiplier * scale).to(out.dtype)

    @torch.no_grad()
    def scale_delta(self, ratio: float) -> None:
        for t in self._units("down") + self._units("up"):
            t.mul_(ratio ** 0.5)

    def merged_weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW (fp32, without the multiplier) at the rank used outside training (the full rank by default)."""
        down, up = self.factors(self.eval_units)
        rank = self.eval_units * self.unit
        return weight_delta(up, down, self._alpha / rank, device=device).reshape(self.org_module.weight.shape)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.multiplier * self.merged_weight_delta(weight.device)

    # A LoRA module's state_dict, not the units': files, resumed states and load_state_dict all see lora_down / up.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down, up = self.factors()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = {"lora_down.weight": self._down_shape, "lora_up.weight": self._up_shape, "alpha": ()}
        for part, shape in expected.items():
            key = prefix + part
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                                  f"shape in the current model is {tuple(shape)}")
                continue
            with torch.no_grad():
                if part == "alpha":
                    self.alpha.copy_(value)
                    self._alpha = float(self.alpha)
                else:
                    axis = 0 if part == "lora_down.weight" else 1
                    for target, piece in zip(self._units(part[5:part.index(".")]), value.split(self.unit, axis)):
                        target.copy_(piece)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in expected)


class DyLoRANetwork(LoRANetwork):
    """networks.lora's network of DyLoRA modules. `begin_step(seed)` draws the rank for a training step."""

    KIND = "DyLoRA"

    def __init__(self, *args, unit: int = 1, **kwargs):
        self.unit = int(unit)  # read by _new_module while LoRANetwork.__init__ builds the modules
        super().__init__(*args, **kwargs)

    def _new_module(self, name: str, org_module: nn.Module, dim: int, alpha: float | None) -> DyLoRAModule:
        return DyLoRAModule(name, org_module, self.multiplier, dim, alpha, self.unit)

    def begin_step(self, seed: int) -> int:
        """Draw this training step's rank: k uniform in 1 .. units, one draw for every module (a module of fewer
        units, from a file of mixed ranks, takes the same fraction of its own). Returns the largest module's rank
        drawn, for logging."""
        fraction = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        drawn = 0
        for module in self.loras:
            module.step_units = min(int(fraction * module.units) + 1, module.units)
            drawn = max(drawn, module.step_units * module.unit)
        return drawn

    def set_rank(self, rank: int | None) -> None:
        """Compute outside training with the first `rank` ranks only (alpha / rank): what a file truncated to that
        rank computes (networks/extract_lora_from_dylora.py). None: the full rank. A module of lower rank (a file of
        mixed ranks) uses all of its own."""
        for module in self.loras:
            if rank is None:
                module.eval_units = module.units
                continue
            if rank < module.unit or rank % module.unit:
                raise ValueError(f"DyLoRA rank {rank}: give a positive multiple of the unit ({module.unit})")
            module.eval_units = min(rank // module.unit, module.units)


def _parse(kwargs: dict, neuron_dropout: float | None, network_dim: int | None, network_alpha: float | None
           ) -> tuple[lora.NetworkArgs, int]:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if neuron_dropout is not None:
        raise ValueError(f"--network_dropout {neuron_dropout}: networks.dylora has no dropout (kohya's neither); "
                         "leave it out")
    unit_text = kwargs.pop("unit", "1")
    try:
        unit = int(str(unit_text).strip())
    except ValueError:
        raise ValueError(f"--network_args unit={unit_text!r}: expected int (the rank step, e.g. unit=4)") from None
    if unit < 1:
        raise ValueError(f"--network_args unit={unit}: must be at least 1")
    args = lora.parse_network_args(kwargs, allowed=ARG_KEYS, module="networks.dylora", own_keys=("unit",))
    if network_dim is not None and network_dim % unit:
        raise ValueError(f"--network_dim {network_dim} is not a multiple of --network_args unit={unit}: DyLoRA "
                         f"trains ranks in steps of unit; give e.g. --network_dim {max(unit, network_dim // unit * unit)}")
    if args.conv_dim is not None and network_dim is not None and args.conv_dim != network_dim:
        raise ValueError(f"--network_args conv_dim={args.conv_dim}: DyLoRA gives 3x3 convolutions the network's rank "
                         f"(--network_dim {network_dim}); give conv_dim={network_dim} or leave it out")
    if args.conv_dim is not None and "conv_alpha" not in kwargs:
        args = args._replace(conv_alpha=1.0 if network_alpha is None else network_alpha)  # kohya's alpha for convs
    return args, unit


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> DyLoRANetwork:
    """kohya's factory (see networks.lora.create_network); `unit` (default 1) is the rank step."""
    args, unit = _parse(kwargs, neuron_dropout, 4 if network_dim is None else network_dim, network_alpha)
    return lora.build_lora_network(DyLoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, args,
                                   unit=unit)


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (ranks and alphas per module; each rank a multiple of `unit`)."""
    args, unit = _parse(kwargs, None, None, None)
    return lora.lora_network_from_weights(DyLoRANetwork, multiplier, file, text_encoder, unet, weights_sd,
                                          for_inference, args, unit=unit)
