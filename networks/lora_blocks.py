"""kohya's numbering of the U-Net's blocks for the block-wise `--network_args` of LoRA-type networks (block_dims,
block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight): one `BlockTable` per family, as data.

SD 1.x / 2.x number 25 blocks of diffusers' layout (`unet_block_index`); SDXL numbers the 23 blocks of Stability's
original layout that its LoRA names use (library/unet_blocks.py, shared with `sdxl_train.py --block_lr`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from library.key_maps import original_unet_module
from library.unet_blocks import SDXL_BLOCK_COUNT, sdxl_block_of

_BLOCK_NAME = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)")


def unet_block_index(lora_name: str) -> int:
    """kohya's SD 1.x / 2.x block index of a U-Net LoRA module named in diffusers' layout (-1 for modules outside
    the 25 blocks). Three slots per level: resnet/attention j, then the down/upsampler."""
    match = _BLOCK_NAME.search(lora_name)
    if match:
        side, level, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        slot = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + slot if side == "down" else 13 + slot
    return 12 if "mid_block_" in lora_name else -1


def _sd_block_of(config: dict, module_path: str) -> int:
    return unet_block_index(module_path.replace(".", "_"))  # (the index reads the path part of a LoRA name)


def _sdxl_block_of(config: dict, module_path: str) -> int:
    # The block is read from the module's original-layout path, the one its LoRA name is built from.
    return sdxl_block_of(original_unet_module(config, module_path))


# The presets kohya accepts for down_lr_weight / up_lr_weight, as curves over n values (n = the table's count),
# each optionally raised by "+base" (e.g. "sine+.5").
LR_WEIGHT_PRESETS: dict[str, Callable[[int], list[float]]] = {
    "cosine": lambda n: [math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))],
    "sine": lambda n: [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
    "linear": lambda n: [i / (n - 1) for i in range(n)],
    "reverse_linear": lambda n: [i / (n - 1) for i in reversed(range(n))],
    "zeros": lambda n: [0.0] * n,
}


@dataclass(frozen=True)
class BlockTable:
    """kohya's numbering of one U-Net family's blocks for the block-wise `--network_args`: block_dims, block_alphas,
    conv_block_dims and conv_block_alphas take one value per block; down_lr_weight, mid_lr_weight and up_lr_weight
    are learning-rate multipliers laid out as [fixed 1.0] * fixed_before + down + mid + up + [fixed 1.0] *
    fixed_after, one per block. The families differ only in these numbers, so they are data."""

    family: str  # in messages
    block_count: int
    blocks: str  # what the block numbers are, in messages
    side_count: int  # values of down_lr_weight and of up_lr_weight
    mid_count: int  # values of mid_lr_weight
    fixed_before: int  # blocks before down_lr_weight's whose multiplier is fixed at 1 (SDXL: the embeddings)
    fixed_after: int  # blocks after up_lr_weight's fixed at 1 (SDXL: out)
    parts: dict[str, str]  # lr option -> the blocks it covers, in messages
    levels: int  # the U-Net structure the numbering covers: at most this many resolution levels ...
    layers_per_block: int  # ... of at most this many ResNet blocks each
    block_of: Callable[[dict, str], int]  # (U-Net config, diffusers module path) -> block, -1 outside the table

    def __post_init__(self):
        assert self.fixed_before + 2 * self.side_count + self.mid_count + self.fixed_after == self.block_count

    def _counted(self, name: str, count: int, given: int, what: str) -> ValueError:
        return ValueError(f"--network_args {name}: {given} value(s) given, expected {count} values ({what}) for "
                          f"this {self.family} U-Net, whose {self.block_count} blocks are {self.blocks}")

    def block_values(self, name: str, spec: str | None, cast) -> list | None:
        """One value per block from a comma-separated `spec` (block_dims, block_alphas, conv_block_*); None if
        not given."""
        if spec is None:
            return None
        try:
            values = [cast(v) for v in str(spec).split(",")]
        except ValueError:
            raise ValueError(f"--network_args {name}={spec!r}: expected {self.block_count} comma-separated "
                             f"{cast.__name__}s, one per {self.family} U-Net block ({self.blocks})") from None
        self.check_block_count(name, len(values))
        return values

    def check_block_count(self, name: str, given: int) -> None:
        if given != self.block_count:
            raise self._counted(name, self.block_count, given, "one per U-Net block")

    def lr_weights(self, down: str | None, mid: str | None, up: str | None, zero_threshold: float = 0.0
                   ) -> list[float] | None:
        """The per-block learning-rate multipliers (block_count of them) from kohya's down/mid/up_lr_weight, or None
        when none is given. As in kohya, a multiplier given (or from a preset) that is <= zero_threshold becomes 0;
        the lists not given, and the fixed blocks, stay at 1."""
        if down is None and mid is None and up is None:
            return None

        def values(name: str, spec: str | None, count: int, presets: bool) -> list[float]:
            if spec is None:
                return [1.0] * count
            preset, plus, base = str(spec).partition("+")
            curve = LR_WEIGHT_PRESETS.get(preset.strip()) if presets else None
            expected = f"{count} comma-separated numbers" + (
                f" or a preset ({', '.join(LR_WEIGHT_PRESETS)}, optionally +base, e.g. sine+.5)" if presets else "")
            try:
                weights = ([w + (float(base) if plus else 0.0) for w in curve(count)] if curve is not None
                           else [float(v) for v in str(spec).split(",")])
            except ValueError:
                raise ValueError(f"--network_args {name}={spec!r}: expected {expected}, one per block of "
                                 f"{self.parts[name]} ({self.family})") from None
            if len(weights) != count:
                raise self._counted(name, count, len(weights), f"{self.parts[name]}; or a preset" if presets
                                    else self.parts[name])
            return [0.0 if w <= zero_threshold else w for w in weights]

        return ([1.0] * self.fixed_before + values("down_lr_weight", down, self.side_count, True)
                + values("mid_lr_weight", mid, self.mid_count, False)
                + values("up_lr_weight", up, self.side_count, True) + [1.0] * self.fixed_after)

    def check_fits(self, unet: nn.Module, options: str) -> None:
        """Refuse the block-wise `options` for a U-Net larger than the table numbers (the SDXL refiner's 4 levels
        under the SDXL base's table would give two blocks one number)."""
        levels, layers = len(unet.config["down_block_types"]), unet.config["layers_per_block"]
        if levels > self.levels or layers > self.layers_per_block:
            raise ValueError(f"--network_args {options}: kohya's {self.family} block table numbers a U-Net of at "
                             f"most {self.levels} levels of {self.layers_per_block} ResNet blocks; this one has "
                             f"{levels} levels of {layers}, so its blocks have no kohya numbers")

    def module_blocks(self, unet: nn.Module, targets: dict[str, nn.Module], options: str) -> dict[str, int]:
        """LoRA name -> block for U-Net layers `targets` (found by unet_targets); `options` name the block-wise
        options that need it, for check_fits' message."""
        self.check_fits(unet, options)
        config = dict(unet.config)
        paths = {id(module): path for path, module in unet.named_modules()}
        return {name: self.block_of(config, paths[id(module)]) for name, module in targets.items()}


SD_BLOCKS = BlockTable(
    family="SD 1.x / 2.x", block_count=25,
    blocks="0: conv_in and the time embedding (no LoRA), 1-11: down_blocks, 12: mid_block, 13-24: up_blocks "
           "(three per level: ResNet / attention 0 and 1, then the down- or upsampler)",
    side_count=12, mid_count=1, fixed_before=0, fixed_after=0,
    parts={"down_lr_weight": "blocks 0-11, the down blocks (block 0 holds no LoRA)",
           "mid_lr_weight": "block 12, the mid block", "up_lr_weight": "blocks 13-24, the up blocks"},
    levels=4, layers_per_block=2, block_of=_sd_block_of)

SDXL_BLOCKS = BlockTable(
    family="SDXL", block_count=SDXL_BLOCK_COUNT,
    blocks="0: time and label embeddings, 1-9: input_blocks 0-8, 10-12: middle_block 0-2, 13-21: output_blocks "
           "0-8, 22: out",
    side_count=9, mid_count=3, fixed_before=1, fixed_after=1,
    parts={"down_lr_weight": "blocks 1-9, input_blocks 0-8", "mid_lr_weight": "blocks 10-12, middle_block 0-2",
           "up_lr_weight": "blocks 13-21, output_blocks 0-8 (blocks 0 and 22 keep multiplier 1)"},
    levels=3, layers_per_block=2, block_of=_sdxl_block_of)
