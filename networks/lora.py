"""LoRA and LoCon for SD 1.x / 2.x and SDXL with kohya-ss/sd-scripts' file format and `--network_module` interface.

A file written here loads in kohya, WebUI, ComfyUI and diffusers, and their files load here, because we keep
kohya's contract exactly:
- module discovery: every nn.Linear / nn.Conv2d inside the U-Net's `Transformer2DModel`s (attention LoRA), plus
  inside `ResnetBlock2D` / `Downsample2D` / `Upsample2D` when LoCon (`conv_dim`) is on; in the text encoders,
  inside `CLIPAttention` and `CLIPMLP` (SDXL's `text_projection` is not targeted);
- names, with "." -> "_": `lora_te_text_model_<path>` for a model with one text encoder, `lora_te1_...` /
  `lora_te2_...` for SDXL's two (`text_encoder_prefixes`); `lora_unet_<path>` where the U-Net path is diffusers'
  for SD 1.x / 2.x and Stability's original layout for SDXL (`unet_names_in_original_layout` says why);
- tensors: `<name>.lora_down.weight` [r, in(, k, k)], `<name>.lora_up.weight` [out, r(, 1, 1)], `<name>.alpha`
  (scalar; scale = alpha / r);
- math: y = W x + up(down(x)) * multiplier * alpha / r, down kaiming-uniform and up zero at init.

`text_encoder` arguments take one module or a list (kohya passes SDXL's as [CLIP ViT-L, OpenCLIP bigG]).

The LoRA is injected by swapping the wrapped module's `forward` (as kohya does), not by replacing the module, so
the base model's state_dict keys never change; `restore()` undoes the swap exactly.

What kohya's other network types share with LoRA lives here too, so they do not copy it (kohya's lora_fa.py is 75 %
lora.py): `NetworkModule` (a module of one layer: name, injection, restore, merge), `AdapterNetwork` (a network's
modules under their kohya names, apply / restore / merge, checked loading, atomic saving), the layer discovery and
naming (`unet_targets`, `text_encoder_targets`), and `build_lora_network` / `lora_network_from_weights` for any
network of LoRA-layout modules. networks/lora_fa.py, dylora.py and oft.py build on them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from library.atomic_files import atomic_file
from library.key_maps import original_unet_module
from library.safetensors_io import save_tensors
from library.tensor_files import open_tensor_file
from library.textual_inversion import bundled_words, split_bundled
from networks.lora_blocks import SD_BLOCKS, SDXL_BLOCKS, BlockTable

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"  # `lora_te1`, `lora_te2` when a model has several (text_encoder_prefixes)
# Matched by class name, like kohya: these are the blocks whose layers kohya's files target.
UNET_ATTENTION_CONTAINERS = ("Transformer2DModel",)
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers 4 had per-backend attention classes; transformers 5 has only CLIPAttention.
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Our network modules name their modules as kohya's files do (so train_network.py and gen_img.py pass them the
# models as they are), in one of two file layouts: "lora" (lora_down / lora_up / alpha; networks.lora, lora_fa,
# dylora) or "oft" (oft_blocks / alpha; networks.oft). External modules (lycoris.kohya) have no FILE_LAYOUT.
FILE_LAYOUT = "lora"

_NO_FORWARD = object()  # marks "the wrapped module had no instance-level forward before apply_to"


class NetworkModule(nn.Module):
    """What every adapter module of one base layer shares (LoRA, LoRA-FA, DyLoRA, OFT): its kohya name, the wrapped
    nn.Linear / nn.Conv2d kept out of the module tree, the multiplier, and injection by swapping the layer's
    `forward` (apply_to / restore, exact). Subclasses define `forward` and `merged_weight`."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = multiplier
        # A list keeps the wrapped module out of this module's children (and out of the network's state_dict).
        self._org = [org_module]
        self._org_forward, self._saved_forward = None, _NO_FORWARD
        # False while the update is merged into the wrapped layer (kohya's pre_calculation): the forward passes
        # through, and stays hooked, so networks hooked after this one on the same layer keep their place.
        self.enabled = True

    org_module = property(lambda self: self._org[0])

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is already applied")
        module = self.org_module
        self._saved_forward = module.__dict__.get("forward", _NO_FORWARD)
        self._org_forward = module.forward
        module.forward = self.forward

    def restore(self) -> None:
        """Put the wrapped module's original forward back (a no-op if not applied)."""
        if not self.is_applied:
            return
        module = self.org_module
        if self._saved_forward is _NO_FORWARD:
            del module.forward  # back to the class's forward, as if we had never touched it
        else:
            module.forward = self._saved_forward
        self._org_forward, self._saved_forward = None, _NO_FORWARD

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's weight with this module (at its multiplier) folded in; `weight` is fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_to_base(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Fold the module into the wrapped layer's weight, computed in fp32 on `device`, rounded through `dtype`
        (kohya's merge_to)."""
        weight = self.org_module.weight
        device = device if device is not None else weight.device
        merged = self.merged_weight(weight.to(device=device, dtype=torch.float32))
        weight.copy_(merged.to(dtype or weight.dtype))


def _check_wrappable(lora_name: str, org_module: nn.Module, what: str) -> None:
    if isinstance(org_module, nn.Conv2d):
        if org_module.groups != 1 or org_module.dilation != (1, 1):
            raise ValueError(f"{lora_name}: grouped or dilated convolutions are not supported")
    elif not isinstance(org_module, nn.Linear):
        raise TypeError(f"{lora_name}: {what} wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")


class LoRAModule(NetworkModule):
    """A low-rank update of one nn.Linear or nn.Conv2d: ΔW = up @ down * alpha / rank."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(lora_name, org_module, multiplier)
        self.lora_dim = int(lora_dim)
        _check_wrappable(lora_name, org_module, "LoRA")
        if isinstance(org_module, nn.Conv2d):
            # The down conv carries the kernel, stride and padding; the up conv is 1x1, so the pair is one conv.
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        # kohya: alpha 0 / None means "no scaling" (alpha = rank). Saved in files, so a buffer.
        self.register_buffer("alpha", torch.tensor(float(alpha or 0) or float(self.lora_dim), dtype=torch.float32))
        self.scale = float(self.alpha) / self.lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as microsoft/LoRA and kohya
        nn.init.zeros_(self.lora_up.weight)  # so a fresh network changes nothing

        self.dropout = dropout or None  # 0 means off (and then draws no random numbers)
        self.rank_dropout, self.module_dropout = rank_dropout or None, module_dropout or None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # kohya fixes `scale` at construction, so loading a file with another alpha left the forward using the
        # old one; we recompute it from whatever alpha was loaded (load_weights, resume, load_state_dict).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if not self.enabled:
            return out
        if self.training and self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return out  # module dropout: skip the whole LoRA branch for this step
        # The wrapped layer may be frozen in bf16/fp16 while the LoRA trains in fp32 (--mixed_precision): the
        # branch computes in its own dtype and hands back the layer's, so it works with or without autocast
        # (under autocast both casts are exact no-ops for the matmul, which autocast runs in half precision).
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.dropout is not None:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout is not None:
            # One keep/drop decision per (sample, rank), shared over tokens / pixels.
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # [B, tokens, r]
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # [B, r, H, W]
                mask = mask[:, :, None, None]
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update unchanged
        return out + (self.lora_up(lx) * self.multiplier * scale).to(out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as the file stores them: [r, in(, kh, kw)] and [out, r(, 1, 1)]."""
        return self.lora_down.weight, self.lora_up.weight

    def down_parameters(self) -> list[torch.Tensor]:
        """The trainable tensors of the down projection (LoRA+ gives them the base learning rate)."""
        return [self.lora_down.weight]

    def up_parameters(self) -> list[torch.Tensor]:
        return [self.lora_up.weight]

    @torch.no_grad()
    def scale_delta(self, ratio: float) -> None:
        """Multiply ΔW by `ratio` (--scale_weight_norms): sqrt(ratio) on each factor, as kohya does."""
        self.lora_up.weight.mul_(ratio ** 0.5)
        self.lora_down.weight.mul_(ratio ** 0.5)

    def merged_weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW (fp32, without the multiplier) in the wrapped module's weight shape (see `weight_delta`)."""
        down, up = self.factors()
        return weight_delta(up, down, self.scale, device=device).reshape(self.org_module.weight.shape)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + multiplier * ΔW."""
        return weight + self.multiplier * self.merged_weight_delta(weight.device)


def weight_delta(up: torch.Tensor, down: torch.Tensor, scale: float, *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW = up @ down * scale (scale = alpha / rank), in fp32, shaped like the wrapped layer's weight:
    [out, in] for Linear, [out, in, kh, kw] for a conv (down [r, in, kh, kw], up [out, r, 1, 1]).

    up.flatten(1) @ down.flatten(1) covers Linear, 1x1 and kxk convs alike: a 1x1 conv after a kxk conv
    with the same stride/padding is one kxk conv whose kernel mixes the down kernels by the up matrix.
    The one formula used by merging, applying, resizing and the LoRA tools."""
    up2d = up.to(device=device, dtype=torch.float32).flatten(1)
    down2d = down.to(device=device, dtype=torch.float32).flatten(1)
    return (up2d @ down2d).reshape(up.shape[0], *down.shape[1:]) * scale


def text_encoder_prefixes(count: int) -> list[str]:
    """kohya's rule: a model with one text encoder names it `lora_te`, one with several `lora_te1`, `lora_te2`, ...
    in the order given (SDXL: CLIP ViT-L, then OpenCLIP bigG). The families' `TextEncoderSlot.lora_prefix` follow it."""
    if count == 1:
        return [PREFIX_TEXT_ENCODER]
    return [f"{PREFIX_TEXT_ENCODER}{i}" for i in range(1, count + 1)]


def unet_names_in_original_layout(unet: nn.Module) -> bool:
    """Whether this U-Net's LoRA modules are named by Stability's original layout: the one place that decides it.

    kohya's SD 1.x / 2.x scripts run diffusers' UNet2DConditionModel, so their files name U-Net modules by diffusers'
    paths (`lora_unet_down_blocks_1_attentions_0_proj_in`); kohya's SDXL scripts run Stability's own U-Net
    (sdxl_original_unet.py), so SDXL files name them by the original layout (`lora_unet_input_blocks_4_1_proj_in`),
    and WebUI / ComfyUI read SDXL LoRAs that way. We run diffusers' U-Net for every family and translate its paths
    with the U-Net key map. SDXL's U-Nets (base and refiner) are the ones conditioned on the pooled text and the
    image size: `addition_embed_type == "text_time"`."""
    config = getattr(unet, "config", None) or {}
    return config.get("addition_embed_type") == "text_time"


def text_encoder_list(text_encoder) -> list[nn.Module]:
    """kohya's `text_encoder` argument as a list: one module, a list / tuple of them (SDXL), or None (none)."""
    if text_encoder is None:
        return []
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if any(encoder is None for encoder in encoders):
        raise ValueError("a text encoder in the list is None; pass the model's text encoders in order "
                         "(SDXL: [CLIP ViT-L, OpenCLIP bigG])")
    if len({id(encoder) for encoder in encoders}) != len(encoders):
        raise ValueError("the same text encoder is given twice")
    return encoders


def find_targets(root: nn.Module, containers: tuple[str, ...] | None, prefix: str,
                 module_path: Callable[[str], str] = lambda path: path) -> dict[str, nn.Module]:
    """kohya's discovery: lora name -> every Linear / Conv2d inside a module whose class name is in `containers`
    (None: anywhere in root), named `prefix` + `module_path(its path in root)` with "." -> "_".

    isinstance (not kohya's exact class-name test) so that subclasses such as old diffusers' LoRACompatibleConv
    are still found."""
    found: dict[str, nn.Module] = {}
    for path, container in root.named_modules():
        if containers is None and path:
            continue  # root itself is the one container
        if containers is not None and type(container).__name__ not in containers:
            continue
        for child_path, child in container.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                full_path = module_path(".".join(p for p in (path, child_path) if p))
                name = f"{prefix}_{full_path.replace('.', '_')}"
                if name in found and found[name] is not child:
                    raise ValueError(f"two modules map to the LoRA name {name}")
                found[name] = child
    return found


def text_encoder_targets(text_encoder, *, every_layer: bool = False) -> list[dict[str, nn.Module]]:
    """The layers a kohya LoRA can target in each text encoder (one dict per encoder, in the order given);
    `every_layer`: every Linear, as files from other trainers may hold (LyCORIS presets; WebUI loads them)."""
    containers = None if every_layer else TEXT_ENCODER_CONTAINERS
    encoders = text_encoder_list(text_encoder)
    targets = []
    for prefix, encoder in zip(text_encoder_prefixes(len(encoders)), encoders):
        # Every kohya/WebUI/ComfyUI/diffusers file names TE modules `<prefix>_text_model_encoder_...`:
        # CLIPTextModelWithProjection and transformers 4's CLIPTextModel have that `text_model.` level,
        # transformers 5's CLIPTextModel does not: add it back.
        level = "" if hasattr(encoder, "text_model") else "text_model."
        targets.append(find_targets(encoder, containers, prefix, lambda path, level=level: level + path))
    return targets


def unet_targets(unet: nn.Module, *, conv: bool, every_layer: bool = False, prefix: str = PREFIX_UNET,
                 containers: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """The U-Net layers a kohya LoRA can target; `conv` adds ResNet blocks and down/upsamplers (LoCon);
    `every_layer`: every Linear / Conv2d (time and size embeddings, conv_in / conv_out: LyCORIS' full presets).
    Other network types name their own `prefix` (kohya's OFT: `oft_unet`) and `containers`."""
    if containers is None:
        containers = UNET_ATTENTION_CONTAINERS + (UNET_CONV_CONTAINERS if conv else ())
    if every_layer:
        containers = None
    if not unet_names_in_original_layout(unet):
        return find_targets(unet, containers, prefix)
    config = dict(unet.config)
    return find_targets(unet, containers, prefix, lambda path: original_unet_module(config, path))


def original_layout_lora_names(unet: nn.Module) -> dict[str, str]:
    """For LoRA modules named after diffusers' U-Net paths, as external kohya-interface modules (lycoris.kohya) name
    them: each such name -> the original-layout name kohya's files use for this family
    (`lora_unet_down_blocks_1_attentions_0_proj_in` -> `lora_unet_input_blocks_4_1_proj_in`). Empty where the
    family's names are diffusers' paths anyway (SD 1.x / 2.x)."""
    if not unet_names_in_original_layout(unet):
        return {}
    config = dict(unet.config)
    names = {}
    for path, _ in unet.named_modules():
        try:
            original = original_unet_module(config, path) if path else None
        except ValueError:  # a container with no module of its own in the original layout (`down_blocks.1`)
            continue
        if original:
            names[f"{PREFIX_UNET}_{path.replace('.', '_')}"] = f"{PREFIX_UNET}_{original.replace('.', '_')}"
    return names


def renamed_modules(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A LoRA state dict (`<module name>.<tensor>` keys) with its module names replaced by `names` where listed."""
    out = {}
    for key, value in state.items():
        module, dot, tensor = key.partition(".")
        out[names.get(module, module) + dot + tensor] = value
    return out


def lora_targets(text_encoder, unet: nn.Module | None, *, conv: bool, every_layer: bool = False
                 ) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(text-encoder, U-Net) layers a kohya LoRA can target, by LoRA name; `text_encoder` is one module or a list
    (SDXL). `conv` adds the layers of ResNet blocks and down/upsamplers (LoCon); a file may hold any subset;
    `every_layer` (reading a file): any Linear / Conv2d. Works on meta-device models too."""
    te_targets: dict[str, nn.Module] = {}
    for targets in text_encoder_targets(text_encoder, every_layer=every_layer):
        te_targets.update(targets)
    return te_targets, (unet_targets(unet, conv=conv, every_layer=every_layer) if unet is not None else {})


# ------------------------------------------------------------------ what module names say about their model

# How a kohya file names U-Net modules: diffusers' paths (SD 1.x / 2.x) or Stability's original layout (SDXL).
_DIFFUSERS_LAYOUT = "diffusers' down_blocks / mid_block / up_blocks layout"
_ORIGINAL_LAYOUT = "Stability's input_blocks / middle_block / output_blocks layout"
_UNET_LAYOUTS = {_DIFFUSERS_LAYOUT: ("down_blocks_", "mid_block_", "up_blocks_"),
                 _ORIGINAL_LAYOUT: ("input_blocks_", "middle_block_", "output_blocks_")}
_SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


@dataclass(frozen=True)
class NameStyle:
    """What a set of kohya module names says about the model it was made for: the text-encoder prefixes and the
    U-Net layout are the two things that differ between the families' files."""

    text_encoder_prefixes: tuple[str, ...]  # e.g. ("lora_te",) or ("lora_te1", "lora_te2")
    unet_layouts: tuple[str, ...]  # keys of _UNET_LAYOUTS found (two: the names mix layouts)

    @property
    def family(self) -> str | None:
        """The family the names point to: "SDXL", "SD 1.x / 2.x", or None when they do not tell (no names of
        either kind, or U-Net names in both layouts)."""
        if len(self.unet_layouts) > 1:
            return None
        sdxl = (any(p in _SDXL_TEXT_ENCODER_PREFIXES for p in self.text_encoder_prefixes)
                or self.unet_layouts == (_ORIGINAL_LAYOUT,))
        if sdxl:
            return "SDXL"
        return "SD 1.x / 2.x" if self.text_encoder_prefixes or self.unet_layouts else None

    @property
    def clues(self) -> str:
        parts = []
        if self.text_encoder_prefixes:
            encoders = "text encoders" if len(self.text_encoder_prefixes) > 1 else "text encoder"
            parts.append(f"{encoders} {' / '.join(p + '_' for p in self.text_encoder_prefixes)}")
        parts += [f"U-Net names in {layout}" for layout in self.unet_layouts]
        return ", ".join(parts)


def name_style(names: Iterable[str]) -> NameStyle:
    names = list(names)
    prefixes = tuple(p for p in (PREFIX_TEXT_ENCODER, *_SDXL_TEXT_ENCODER_PREFIXES)
                     if any(n.startswith(p + "_") for n in names))
    # kohya's OFT names U-Net modules `oft_unet_...`, by the same layouts.
    unet = [n.split("_unet_", 1)[1] for n in names if n.startswith((PREFIX_UNET + "_", "oft_unet_"))]
    layouts = tuple(layout for layout, starts in _UNET_LAYOUTS.items() if any(n.startswith(starts) for n in unet))
    return NameStyle(prefixes, layouts)


def family_mismatch_hint(lora_names: Iterable[str], model_names: Iterable[str]) -> str:
    """A sentence for an error message saying which family a LoRA's module names point to when it is not the
    model's (e.g. an SDXL LoRA on an SD 1.x model), or that its U-Net names use the other layout; "" otherwise."""
    lora, model = name_style(lora_names), name_style(model_names)
    if lora.family and model.family and lora.family != model.family:
        return (f"Its names are those of a LoRA for {lora.family} ({lora.clues}); this model is {model.family} "
                f"({model.clues}).")
    if lora.unet_layouts and model.unet_layouts and lora.unet_layouts != model.unet_layouts:
        return (f"Its U-Net names are in {' and '.join(lora.unet_layouts)}; this model's LoRA names are in "
                f"{model.unet_layouts[0]} (kohya's layout for {model.family}).")
    return ""


class AdapterNetwork(nn.Module):
    """What every network of this suite shares (networks.lora, lora_fa, dylora, oft): its modules registered under
    their kohya names (so `state_dict()` keys are exactly the file's keys), split into text-encoder and U-Net parts;
    injection into the models it was built for and exact removal; merging; checked file loading and atomic saving;
    and kohya's small trainer hooks. A subclass builds the modules and says how they train
    (`prepare_optimizer_params`)."""

    UNET_PREFIX = PREFIX_UNET  # the start of the U-Net module names; kohya's OFT uses `oft_unet`
    TEXT_ENCODER_PREFIX = PREFIX_TEXT_ENCODER  # `lora_te`, `lora_te1`, `lora_te2`

    def __init__(self, text_encoder, unet: nn.Module | None, *, multiplier: float = 1.0):
        super().__init__()
        self.multiplier = multiplier
        # Kept out of the module tree; used to check apply_to's arguments (and, in LoRANetwork, to number blocks).
        self._models = (text_encoder_list(text_encoder), unet)
        self.text_encoder_loras: list[NetworkModule] = []
        self.unet_loras: list[NetworkModule] = []

    @property
    def loras(self) -> list[NetworkModule]:
        return self.text_encoder_loras + self.unet_loras

    def _register(self, modules: list[NetworkModule]) -> list[NetworkModule]:
        for module in modules:
            self.add_module(module.lora_name, module)
        return modules

    def _text_encoder_loras_by_prefix(self) -> list[tuple[str, list[NetworkModule]]]:
        """(prefix, modules) per text encoder the network was built for, in their order."""
        prefixes = text_encoder_prefixes(len(self._models[0])) if self._models[0] else []
        return [(prefix, [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")])
                for prefix in prefixes]

    def _drop(self, loras: list[NetworkModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)
        loras.clear()

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Inject into the models. A part not applied is discarded (as in kohya): neither trained nor saved."""
        # Catches a network built on one model instance and applied to a copy (it would silently do nothing).
        given_encoders, (built_encoders, built_unet) = text_encoder_list(text_encoder), self._models
        if given_encoders and built_encoders and (len(given_encoders) != len(built_encoders) or any(
                given is not built for given, built in zip(given_encoders, built_encoders))):
            raise ValueError("apply_to: this network was built for another text encoder instance (or list of them)")
        if unet is not None and built_unet is not None and unet is not built_unet:
            raise ValueError("apply_to: this network was built for another U-Net instance")
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
        if not apply_unet:
            self._drop(self.unet_loras)
        for lora in self.loras:
            lora.apply_to()

    def restore(self) -> None:
        """Undo apply_to: every wrapped module gets its original forward back."""
        for lora in reversed(self.loras):
            lora.restore()

    def remove_from(self, text_encoder=None, unet=None) -> None:  # kohya-style alias of restore()
        self.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Fold the modules (at the multiplier) into the base weights. With `weights_sd`, merge those weights (only
        the parts, text encoder / U-Net, that it has keys for); otherwise merge the network's current weights."""
        if any(lora.is_applied for lora in self.loras):
            raise RuntimeError("merge_to on an applied network would count it twice; call restore() first")
        if weights_sd is not None:
            if not any(k.startswith(self.TEXT_ENCODER_PREFIX) for k in weights_sd):
                self._drop(self.text_encoder_loras)
            if not any(k.startswith(self.UNET_PREFIX) for k in weights_sd):
                self._drop(self.unet_loras)
            info = self._load_checked(weights_sd, "weights_sd")
            if info.missing_keys:
                raise ValueError(f"merge_to: weights_sd lacks {len(info.missing_keys)} key(s): "
                                 f"{', '.join(info.missing_keys[:20])}")
        for lora in self.loras:
            lora.merge_to_base(dtype=dtype, device=device)
        logger.info("merged %d %s modules into the base weights", len(self.loras), type(self).__name__)

    # kohya's pre-calculation interface (gen_img --network_pre_calc): the applied network's update merged into the
    # base weights for a batch (one matmul per layer instead of two extra), and taken out again before the next.

    def backup_weights(self) -> None:
        """Keep a copy of every wrapped layer's weight (once), for restore_weights."""
        if getattr(self, "_weight_backup", None) is None:
            self._weight_backup = {lora.lora_name: lora.org_module.weight.detach().clone() for lora in self.loras}

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Every module folded into its wrapped layer (LoRA: W += multiplier * ΔW; OFT: W = Rᵀ W) at the
        current multiplier, and its branch switched off
        (kohya's `enabled`): the network acts as merged until restore_weights. Networks applied to the same layers
        are each merged in turn, in any order (the deltas add)."""
        if getattr(self, "_weight_backup", None) is None:
            raise RuntimeError("pre_calculation needs backup_weights() first (to undo it)")
        for lora in self.loras:
            lora.merge_to_base()
            lora.enabled = False
        self._pre_calculated = True

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Undo pre_calculation: the backed-up weights exactly, and the LoRA branch on again. With several
        networks on the same layers, restore all of them before pre-calculating any again (kohya's order): each
        backup holds the weights from before any merge only if taken before."""
        if not getattr(self, "_pre_calculated", False):
            return
        for lora in self.loras:
            lora.org_module.weight.copy_(self._weight_backup[lora.lora_name])
            lora.enabled = True
        self._pre_calculated = False

    def get_trainable_params(self):
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        pass  # nothing to checkpoint in an adapter branch; kohya's trainer calls it

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    # ------------------------------------------------------------------ files

    def _load_checked(self, weights_sd: dict[str, torch.Tensor], source: str):
        own = self.state_dict()
        unexpected = sorted(set(weights_sd) - set(own))
        wrong_shapes = [f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in the network"
                        for k, v in weights_sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if unexpected or wrong_shapes:
            hint = family_mismatch_hint({k.split(".")[0] for k in weights_sd}, {k.split(".")[0] for k in own})
            lines = [f"{source} does not fit this network:" + (f" {hint}" if hint else "")]
            if unexpected:
                lines.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:20])}")
            lines += wrong_shapes[:20]
            raise ValueError("\n  ".join(lines))
        info = self.load_state_dict(weights_sd, strict=False)
        if info.missing_keys:
            logger.warning("%s lacks %d key(s) (kept at their initial values): %s", source,
                           len(info.missing_keys), ", ".join(info.missing_keys[:20]))
        return info

    def load_weights(self, file: str | Path):
        """Load a network file: shapes must match and no key may be unknown. Returns torch's
        (missing_keys, unexpected_keys) info; missing keys keep their current values, as in kohya. Bundled
        embeddings (`bundle_emb.*`) are not network weights and are left out."""
        weights, _ = split_bundled(read_weights(file))
        return self._load_checked(weights, str(file))

    def save_weights(self, file: str | Path, dtype: torch.dtype | None, metadata: dict[str, str] | None, *,
                     extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the network atomically: .safetensors with string metadata, anything else with torch.save.
        `extra_tensors` are written beside the weights as they are (e.g. bundled embeddings)."""
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                 for k, v in self.state_dict().items()}
        state.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
        if Path(file).suffix.lower() == ".safetensors":
            save_tensors(file, state, metadata or None)
        else:
            with atomic_file(file) as tmp:
                torch.save(state, tmp)


class LoRANetwork(AdapterNetwork):
    """All LoRA modules of one U-Net and its text encoder(s): kohya's networks.lora. Subclasses (LoRA-FA, DyLoRA)
    make other modules of the same file layout (`_new_module`)."""

    def __init__(self, text_encoder, unet: nn.Module | None, *, multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 conv_lora_dim: int | None = None, conv_alpha: float | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None,
                 block_dims: list[int] | None = None, block_alphas: list[float] | None = None,
                 conv_block_dims: list[int] | None = None, conv_block_alphas: list[float] | None = None):
        super().__init__(text_encoder, unet, multiplier=multiplier)
        self.block_lr_weights: list[float] | None = None  # set_block_lr_weight
        self.loraplus_ratios = (None, None)  # (unet, text encoder): set_loraplus_lr_ratio
        self.dropouts = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        text_encoders = self._models[0]
        # kohya's block numbering for this U-Net's family, and each U-Net LoRA's block in it: found when a
        # block-wise option needs it (here for block_dims, or later in set_block_lr_weight).
        self.block_table = unet_block_table(unet)
        self._unet_blocks: dict[str, int] | None = None
        for option, values in (("block_dims", block_dims), ("block_alphas", block_alphas),
                               ("conv_block_dims", conv_block_dims), ("conv_block_alphas", conv_block_alphas)):
            if values is not None:
                self.block_table.check_block_count(option, len(values))
        if block_dims is not None and block_alphas is None:
            block_alphas = [alpha] * len(block_dims)
        if conv_block_dims is not None and conv_block_alphas is None:
            conv_block_alphas = [conv_alpha or 1.0] * len(conv_block_dims)

        def dim_alpha(name: str, module: nn.Module):
            if modules_dim is not None:  # from a file: exactly the modules (and ranks) it has
                return modules_dim.get(name), modules_alpha.get(name)
            # kohya: 3x3 convs get conv_dim/conv_alpha; Linear and 1x1 convs (even time_emb_proj and
            # conv_shortcut inside ResNet blocks) get network_dim/network_alpha.
            is_kxk = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            block = (self._unet_blocks or {}).get(name, -1)
            if block >= 0 and is_kxk and conv_block_dims is not None:
                return conv_block_dims[block], conv_block_alphas[block]
            if block >= 0 and not is_kxk and block_dims is not None:
                return block_dims[block], block_alphas[block]
            return (conv_lora_dim, conv_alpha) if is_kxk else (lora_dim, alpha)

        def build(targets: dict[str, nn.Module]) -> list[LoRAModule]:
            loras = []
            for name, module in targets.items():
                dim, a = dim_alpha(name, module)
                if dim:
                    loras.append(self._new_module(name, module, dim, a))
            return self._register(loras)

        conv = bool(conv_lora_dim or conv_block_dims or modules_dim is not None)
        # A file's modules may be anywhere it put them (other trainers target more layers than kohya's defaults).
        te_targets, unet_targets = lora_targets(text_encoders, unet, conv=conv, every_layer=modules_dim is not None)
        if unet is not None and (block_dims is not None or conv_block_dims is not None):
            self._unet_blocks = self.block_table.module_blocks(unet, unet_targets, "block_dims / conv_block_dims")
        if modules_dim is not None:
            unknown = sorted(set(modules_dim) - set(te_targets) - set(unet_targets))
            if unknown:
                hint = (family_mismatch_hint(modules_dim, [*te_targets, *unet_targets])
                        or "Is it a LoRA for another base model family?")
                more = f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else ""
                raise ValueError(f"{len(unknown)} of {len(modules_dim)} LoRA module(s) in the weights match no layer "
                                 f"of these models. {hint} Unmatched: {', '.join(unknown[:12])}{more}")
        self.text_encoder_loras = build(te_targets)
        self.unet_loras = build(unet_targets)
        counts = [f"{len(loras)} {prefix}" for prefix, loras in self._text_encoder_loras_by_prefix()]
        logger.info("%s: %s text-encoder modules, %d U-Net modules", self.KIND, " + ".join(counts) or "0",
                    len(self.unet_loras))

    KIND = "LoRA"  # in messages

    def _new_module(self, name: str, org_module: nn.Module, dim: int, alpha: float | None) -> LoRAModule:
        """The module for one layer: networks.lora's LoRAModule; other LoRA-layout networks make their own."""
        return LoRAModule(name, org_module, self.multiplier, dim, alpha, **self.dropouts)

    def prepare_optimizer_params(self, text_encoder_lr: float | list[float | None] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict], list[str]]:
        """Param groups "textencoder" and "unet" (kohya's names, used for TensorBoard lr/<name>). A part whose
        learning rate is None (after falling back to default_lr) or 0 gets no group and is frozen.

        `text_encoder_lr` may be a list: one value (as kohya's networks.lora reads --text_encoder_lr: SDXL's two
        encoders share it), or one per text encoder, which gives groups "textencoder1", "textencoder2"."""
        if not any(lora.is_applied for lora in self.loras):
            raise RuntimeError("prepare_optimizer_params: call apply_to() first")
        self.requires_grad_(True)
        groups, descriptions = [], []
        unet_ratio, te_ratio = self.loraplus_ratios
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        per_encoder = self._text_encoder_loras_by_prefix()
        if len(te_lrs) <= 1 or not self.text_encoder_loras:
            parts = [("textencoder", self.text_encoder_loras, te_lrs[0] if te_lrs else None, te_ratio)]
        elif len(te_lrs) == len(per_encoder):
            parts = [(f"textencoder{i}", loras, lr, te_ratio)
                     for i, ((_, loras), lr) in enumerate(zip(per_encoder, te_lrs), start=1)]
        else:
            raise ValueError(f"text encoder learning rates {te_lrs}: give one, or one per text encoder "
                             f"({len(per_encoder)})")
        if self.block_lr_weights is None:
            parts.append(("unet", self.unet_loras, unet_lr, unet_ratio))
        else:
            base = default_lr if unet_lr is None else unet_lr
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault((self._unet_blocks or {}).get(lora.lora_name, -1), []).append(lora)
            for block, loras in sorted(by_block.items()):
                weight = 1.0 if block < 0 else self.block_lr_weights[block]
                parts.append((f"unet_block{block}", loras, (base or 0.0) * weight, unet_ratio))
        for description, loras, lr, ratio in parts:
            lr = default_lr if lr is None else lr
            if not loras:
                continue
            if not lr:
                logger.info("%s LoRA: learning rate %s, not trained", description, lr)
                for lora in loras:
                    lora.requires_grad_(False)  # no gradients computed for a part nobody updates
                continue
            if ratio:
                # LoRA+: the up projections learn `ratio` times faster (the paper suggests 16).
                groups.append({"params": [p for lora in loras for p in lora.down_parameters()], "lr": lr})
                groups.append({"params": [p for lora in loras for p in lora.up_parameters()], "lr": lr * ratio})
                descriptions += [description, f"{description} plus"]
            else:
                groups.append({"params": [p for lora in loras for p in lora.parameters()], "lr": lr})
                descriptions.append(description)
        return groups, descriptions

    def set_block_lr_weight(self, weights: list[float] | None) -> None:
        """Per-U-Net-block learning-rate multipliers, one per block of the U-Net's table (`block_table`: kohya's 25
        SD 1.x / 2.x blocks or 23 SDXL blocks); None: one learning rate for the whole U-Net."""
        options = "down_lr_weight / mid_lr_weight / up_lr_weight"
        if weights is not None:
            self.block_table.check_block_count(options, len(weights))
            unet = self._models[1]
            if self._unet_blocks is None and unet is not None:
                self._unet_blocks = self.block_table.module_blocks(
                    unet, {lora.lora_name: lora.org_module for lora in self.unet_loras}, options)
        self.block_lr_weights = weights

    def set_loraplus_lr_ratio(self, ratio: float | None, unet_ratio: float | None = None,
                              text_encoder_ratio: float | None = None) -> None:
        self.loraplus_ratios = (unet_ratio or ratio, text_encoder_ratio or ratio)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device=None) -> tuple[int, float, float]:
        """kohya's --scale_weight_norms: scale each module's delta W (with alpha/rank) by r so that its norm is at
        most `max_norm` (networks.lora: sqrt(r) on each of up and down). Returns (modules scaled, mean norm, max norm) after."""
        scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.merged_weight_delta(device).float().norm()
            # kohya clamps the norm from below at max_norm / 2 before taking the ratio (avoids blowing up tiny ones)
            norm_for_ratio = norm.clamp(min=max_norm / 2)
            ratio = (torch.clamp(norm_for_ratio, max=max_norm) / norm_for_ratio).item()
            if ratio != 1.0:
                scaled += 1
                lora.scale_delta(ratio)
            norms.append(norm.item() * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    with open_tensor_file(file) as source:
        return {name: lazy.load() for name, lazy in source.tensors.items()}


# ---------------------------------------------------------------------- kohya's U-Net block tables


def unet_block_table(unet: nn.Module | None) -> BlockTable:
    """kohya's block table for this U-Net: its SDXL table numbers the original layout that SDXL LoRA names use
    (`unet_names_in_original_layout` decides which), its SD 1.x / 2.x table diffusers' layout."""
    return SDXL_BLOCKS if unet_names_in_original_layout(unet) else SD_BLOCKS


# ---------------------------------------------------------------------- kohya's module-level interface

# Every key kohya's networks.lora accepts, with its type. Any other key is refused loudly rather than ignored, so a
# run never silently trains something other than what was asked for.
_ARG_TYPES = {"conv_dim": int, "conv_alpha": float, "dropout": float, "rank_dropout": float, "module_dropout": float,
              "block_dims": str, "block_alphas": str, "conv_block_dims": str, "conv_block_alphas": str,
              "down_lr_weight": str, "mid_lr_weight": str, "up_lr_weight": str, "block_lr_zero_threshold": float,
              "loraplus_lr_ratio": float, "loraplus_unet_lr_ratio": float, "loraplus_text_encoder_lr_ratio": float}


class NetworkArgs(NamedTuple):
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    block_dims: str | None = None
    block_alphas: str | None = None
    conv_block_dims: str | None = None
    conv_block_alphas: str | None = None
    down_lr_weight: str | None = None
    mid_lr_weight: str | None = None
    up_lr_weight: str | None = None
    block_lr_zero_threshold: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None


def parse_network_args(kwargs: dict[str, object], neuron_dropout: float | None = None, *,
                       allowed: Iterable[str] | None = None, module: str = "networks.lora",
                       own_keys: Iterable[str] = ()) -> NetworkArgs:
    """Typed values from `--network_args` (strings, key=value). `allowed`: the subset of networks.lora's keys that
    `module` accepts (all by default); `own_keys`: keys the module reads itself (named in the message only)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    allowed = set(_ARG_TYPES if allowed is None else allowed)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"--network_args: unknown key(s) for {module}: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(allowed | set(own_keys)))})")
    values = {}
    for key, value in kwargs.items():
        try:
            values[key] = _ARG_TYPES[key](str(value).strip())
        except ValueError:
            raise ValueError(f"--network_args {key}={value!r}: expected {_ARG_TYPES[key].__name__}") from None
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= values.get(key, 0.0) < 1.0:
            raise ValueError(f"--network_args {key}={values[key]}: must be in [0, 1)")
    if neuron_dropout is not None:  # --network_dropout; the trainer may also pass it again as dropout=
        if "dropout" in values and values["dropout"] != neuron_dropout:
            raise ValueError(f"--network_dropout {neuron_dropout} conflicts with --network_args "
                             f"dropout={values['dropout']}")
        values["dropout"] = neuron_dropout
    if "conv_dim" in values and values.get("conv_alpha") is None:
        values["conv_alpha"] = 1.0  # kohya's default
    return NetworkArgs(**values)


# The options that number U-Net blocks (by the U-Net's BlockTable).
_BLOCK_OPTIONS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                  "mid_lr_weight", "up_lr_weight")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """kohya's factory: `text_encoder` is one text encoder or a list of them (SDXL: [CLIP ViT-L, OpenCLIP bigG]).
    The block-wise options count the U-Net's blocks by its family's table (`unet_block_table`)."""
    return build_lora_network(LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                              parse_network_args(kwargs, neuron_dropout))


def build_lora_network(network_class: type[LoRANetwork], multiplier: float, network_dim: int | None,
                       network_alpha: float | None, text_encoder, unet, args: NetworkArgs,
                       **network_kwargs) -> LoRANetwork:
    """create_network's work for any LoRA-layout network class; `network_kwargs` go to its constructor."""
    table = unet_block_table(unet)
    block_options = [name for name in _BLOCK_OPTIONS if getattr(args, name) is not None]
    if block_options and unet is not None:
        table.check_fits(unet, ", ".join(block_options))
    lora_dim = 4 if network_dim is None else network_dim  # kohya's defaults
    alpha = 1.0 if network_alpha is None else network_alpha
    lr_weights = table.lr_weights(args.down_lr_weight, args.mid_lr_weight, args.up_lr_weight,
                                  args.block_lr_zero_threshold)
    # Every list is checked against the table even where it goes unused (block_alphas without block_dims).
    given = {name: table.block_values(name, getattr(args, name), cast) for name, cast in
             (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int), ("conv_block_alphas", float))}
    count = table.block_count
    block_dims = given["block_dims"]
    if block_dims is None and lr_weights is not None:
        block_dims = [lora_dim] * count  # kohya: per-block learning rates make the ranks per-block too
    block_alphas = (given["block_alphas"] or [alpha] * count) if block_dims else None
    conv_block_dims = given["conv_block_dims"]
    if conv_block_dims is None and lr_weights is not None and args.conv_dim:
        conv_block_dims = [args.conv_dim] * count
    conv_block_alphas = (given["conv_block_alphas"] or [args.conv_alpha or 1.0] * count) if conv_block_dims else None
    if lr_weights is not None:
        # kohya: a block whose learning rate is 0 gets no module at all, neither LoRA nor LoCon.
        block_dims = [0 if w == 0 else d for w, d in zip(lr_weights, block_dims)]
        if conv_block_dims is not None:
            conv_block_dims = [0 if w == 0 else d for w, d in zip(lr_weights, conv_block_dims)]
    network = network_class(
        text_encoder, unet, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha,
        dropout=args.dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
        conv_lora_dim=args.conv_dim, conv_alpha=args.conv_alpha, block_dims=block_dims, block_alphas=block_alphas,
        conv_block_dims=conv_block_dims, conv_block_alphas=conv_block_alphas, **network_kwargs)
    network.set_block_lr_weight(lr_weights)
    network.set_loraplus_lr_ratio(args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio,
                                  args.loraplus_text_encoder_lr_ratio)
    return network


def dims_from_weights(weights_sd: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (from lora_down's first dimension) and alpha (alpha = rank when a file has none)."""
    odd = sorted(k for k in weights_sd if "." not in k or not k.endswith(KEY_SUFFIXES))
    if odd and all(k.startswith("oft_unet_") for k in odd):
        raise ValueError("a kohya OFT file (oft_unet_*.oft_blocks), not a LoRA: load it with --network_module "
                         "networks.oft")
    if odd:
        raise ValueError(f"not a plain kohya LoRA (LyCORIS / DoRA / other keys?): {', '.join(odd[:20])}")
    dims = {k[:-len(".lora_down.weight")]: v.shape[0] for k, v in weights_sd.items()
            if k.endswith(".lora_down.weight")}
    alphas = {name: float(weights_sd[f"{name}.alpha"].float()) if f"{name}.alpha" in weights_sd else float(dim)
              for name, dim in dims.items()}
    return dims, alphas


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a file (modules, ranks, alphas), weights not loaded (kohya: the caller loads or
    merges them). `--network_args` dims are ignored, since the file decides them; dropouts apply to training, and
    per-block learning rates (down/mid/up_lr_weight) to its optimizer groups, as in kohya."""
    return lora_network_from_weights(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference,
                                     parse_network_args(kwargs))


def lora_network_from_weights(network_class: type[LoRANetwork], multiplier: float, file, text_encoder, unet,
                              weights_sd: dict[str, torch.Tensor] | None, for_inference: bool, args: NetworkArgs,
                              **network_kwargs) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """create_network_from_weights' work for any LoRA-layout network class."""
    if weights_sd is None:
        weights_sd = read_weights(file)
    # A LoRA with bundled embeddings (--bundle_embeddings, WebUI's bundle_emb.*): the network is the rest. The
    # weights returned (which callers load or merge) leave them out too; the words are not applied from here.
    weights_sd, bundled = split_bundled(weights_sd)
    if bundled:
        logger.info("%s carries embedding(s) %s (bundle_emb.*): not network weights, left out here", file or "LoRA",
                    ", ".join(bundled_words(bundled)))
    dims, alphas = dims_from_weights(weights_sd)
    dropouts = {} if for_inference else dict(dropout=args.dropout, rank_dropout=args.rank_dropout,
                                              module_dropout=args.module_dropout)
    network = network_class(text_encoder, unet, multiplier=multiplier,
                            modules_dim=dims, modules_alpha=alphas, **dropouts, **network_kwargs)
    network.set_block_lr_weight(network.block_table.lr_weights(args.down_lr_weight, args.mid_lr_weight,
                                                               args.up_lr_weight, args.block_lr_zero_threshold))
    return network, weights_sd


def merge_weight_files(files: list[str], multipliers: list[float] | None, text_encoder, unet) -> None:
    """Merge LoRA files into the models' weights (kohya's --base_weights / --base_weights_multiplier: one
    multiplier for all files, or one per file; default 1)."""
    multipliers = list(multipliers or [])
    if len(multipliers) not in (0, 1, len(files)):
        raise ValueError(f"give one multiplier, or one per file ({len(files)}); got {len(multipliers)}")
    for i, file in enumerate(files):
        multiplier = multipliers[i] if len(multipliers) > 1 else (multipliers[0] if multipliers else 1.0)
        try:
            network, weights = create_network_from_weights(multiplier, file, None, text_encoder, unet,
                                                           for_inference=True)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        network.merge_to(text_encoder, unet, weights)
        logger.info("merged %s into the base model (multiplier %s)", file, multiplier)
