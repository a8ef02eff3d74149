"""kohya's `--lbws` (LoRA block weights): one merge weight per U-Net block for each LoRA, shared by merge_lora.py,
sdxl_merge_lora.py and svd_merge_lora.py.

The 26 blocks are those of the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight), which kohya's
tools follow: BASE holds every text-encoder module; IN00..IN11, MID and OUT00..OUT11 are the original (Stability /
LDM) U-Net's `input_blocks.N`, `middle_block` and `output_blocks.N`. SDXL's U-Net has input and output blocks 0..8
only; its full table is the 20-value preset.

`--lbws` gives one JSON list of numbers per LoRA (`"[1,0,0.5,...]"`), all of one length; the length picks a preset,
the blocks its values go to in order (`PRESETS`). Blocks a preset leaves out keep weight 1. A module's update is
multiplied by its block's weight, on top of its LoRA's ratio: ratio * weight * ΔW.

A module's block comes from its layer's path in the original layout, which the U-Net key map gives for any
diffusers path (`key_maps.original_unet_module`). So SD 1.x / 2.x names (diffusers' layout) and SDXL names (already
the original layout) go through one rule, and no block arithmetic is written here: the layer of a module is found
in the model being merged into (`lora_checkpoint.lora_layers`) or, for LoRA-only merges, in the U-Net of the family
its names point to, built from the shipped config on the meta device. (kohya picks its naming rule from the length
instead: 12 and 20 values mean SDXL names, so its 12 values on an SD 1.x LoRA weight the text encoder only; here
they weight SD 1.x's blocks as listed.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from library.families import FAMILIES, ModelFamily
from library.key_maps import UNET_PREFIX, key_table, original_unet_module
from library.sd_checkpoint import SDCheckpoint
from networks.lora import PREFIX_TEXT_ENCODER, name_style, unet_targets
from networks.lora_checkpoint import lora_layers, match_lora
from networks.lora_files import LoRAFactors, LoRAFile, LoRAFileError, short_list

logger = logging.getLogger(__name__)

BLOCKS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
BASE = 0
_INDEX = {name: i for i, name in enumerate(BLOCKS)}

# The blocks each preset's values go to, in order (kohya's LAYER12 / LAYER17 / LAYER20 / LAYER26). 17 are the blocks
# that hold attention layers in SD 1.x / 2.x, 12 those in SDXL (a LoRA without LoCon has modules in these only).
PRESETS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))),  # SDXL's table
    26: BLOCKS,
}
_LENGTHS = ", ".join(map(str, sorted(PRESETS)))


# --------------------------------------------------------------------------------------------- the flag


@dataclass(frozen=True)
class BlockWeights:
    """One LoRA's weight for each of the 26 blocks (BLOCKS order)."""

    weights: tuple[float, ...]

    def __getitem__(self, block: int) -> float:
        return self.weights[block]

    def __str__(self) -> str:
        return " ".join(f"{name}={weight:g}" for name, weight in zip(BLOCKS, self.weights))


def add_lbws_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="kohya's LoRA block weights: one JSON list per LoRA, e.g. \"[1,0,0.5,...]\", of 12, 17, "
                             "20 or 26 numbers (BASE, IN00..IN11, MID, OUT00..OUT11 or a preset of them; blocks left "
                             "out: 1)")


def parse_lbws(specs: list[str] | None, model_count: int) -> list[BlockWeights] | None:
    """`--lbws` as given (one string per model, or None when the flag is absent) -> one BlockWeights per model."""
    if specs is None:
        return None
    if len(specs) != model_count:
        raise LoRAFileError(f"--lbws: {len(specs)} list(s) for {model_count} model(s); give one JSON list per model, "
                            f"in the order of --models, each of length {_LENGTHS}")
    lists = [_parse_one(spec) for spec in specs]
    lengths = sorted({len(values) for values in lists})
    if len(lengths) > 1:
        raise LoRAFileError(f"--lbws {' '.join(specs)}: the lists have different lengths "
                            f"({', '.join(map(str, lengths))}); all must use one preset length, {_LENGTHS}")
    return [_expand(values) for values in lists]


def _parse_one(spec: str) -> list[float]:
    try:
        values = json.loads(spec)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise LoRAFileError(f"--lbws {spec!r}: expected a JSON list of finite numbers such as \"[1,0,0.5,...]\", of "
                            f"length {_LENGTHS}")
    if len(values) not in PRESETS:
        raise LoRAFileError(f"--lbws {spec!r}: {len(values)} values; the allowed lengths are {_LENGTHS} (kohya's "
                            "presets: 26 = every block, 20 = SDXL's blocks)")
    return [float(v) for v in values]


def _is_number(value) -> bool:
    # JSON true / false arrive as bool, a subclass of int: not a weight.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _expand(values: list[float]) -> BlockWeights:
    weights = [1.0] * len(BLOCKS)  # blocks the preset leaves out keep weight 1
    for name, value in zip(PRESETS[len(values)], values):
        weights[_INDEX[name]] = value
    return BlockWeights(tuple(weights))


# --------------------------------------------------------------------------------- the block of a module


def block_of_original(path: str) -> int | None:
    """The block of an original-layout U-Net path ('input_blocks.4.1.proj_in' -> IN04), None outside the blocks
    (time_embed, label_emb, out)."""
    part, _, rest = path.partition(".")
    if part == "middle_block":
        return _INDEX["MID"]
    if part in ("input_blocks", "output_blocks"):
        prefix = "IN" if part == "input_blocks" else "OUT"
        return _INDEX.get(f"{prefix}{int(rest.partition('.')[0]):02d}")
    return None


def layer_block(component: str, module_path: str, unet_config: dict) -> int:
    """The block of a LoRA layer: BASE for a text encoder's, the block of its original path for a U-Net layer
    (given by its diffusers module path)."""
    if component != "unet":
        return BASE
    original = original_unet_module(unet_config, module_path)
    block = block_of_original(original)
    if block is None:  # kohya's LoRA targets all lie inside the blocks; anything else is a layer we do not know
        raise LoRAFileError(f"--lbws: the U-Net layer {module_path} ({original}) is in none of the 26 blocks")
    return block


def present_blocks(unet_config: dict) -> frozenset[int]:
    """The blocks a model with this U-Net has (BASE and every block one of its tensors is in)."""
    originals = (m.original[len(UNET_PREFIX):] for m in key_table("unet", unet_config).mappings)
    return frozenset({BASE} | {b for b in map(block_of_original, originals) if b is not None})


@dataclass(frozen=True)
class ModuleBlocks:
    """The block of every module of one LoRA, and the blocks of the model it is merged for."""

    blocks: dict[str, int]  # LoRA module name -> index into BLOCKS
    present: frozenset[int]
    model: str  # says which model `present` describes, for messages


def checkpoint_module_blocks(checkpoint: SDCheckpoint, loras: list[LoRAFile]) -> list[ModuleBlocks]:
    """Blocks of the LoRAs' modules from the layers they change in `checkpoint`. A LoRA that does not fit the model
    is refused here, with the message merging gives, since modules at weight 0 are not merged (not checked there)."""
    layers = lora_layers(checkpoint, conv=True)
    config = checkpoint.configs.unet
    present = present_blocks(config)
    result = []
    for lora in loras:
        matched = match_lora(lora, layers, checkpoint.family.description)
        blocks = {name: layer_block(layer.component, layer.key.removesuffix(".weight"), config)
                  for name, layer in matched.items()}
        result.append(ModuleBlocks(blocks, present, checkpoint.family.description))
    return result


def lora_module_blocks(lora: LoRAFile) -> ModuleBlocks:
    """Blocks of a LoRA's modules without a model: the text-encoder modules are BASE; the U-Net modules are looked up
    in the U-Net of the first family their names point to (kohya's SD 1.x / 2.x or SDXL names) that has them all.
    Families of one naming style agree on the block of every name they share (SD 1.x and 2.x have the same blocks;
    an SDXL name carries its original block number), so the first that fits decides."""
    text_encoder = {name: BASE for name in lora.modules if name.startswith(PREFIX_TEXT_ENCODER)}
    unet_names = set(lora.modules) - set(text_encoder)
    style = name_style(lora.modules).family
    for family in _families_named_like(style):
        table = family_unet_blocks(family.name)
        if unet_names <= table.keys():
            blocks = {**text_encoder, **{name: table[name] for name in unet_names}}
            model = f"an {style} U-Net" if style else family.description
            return ModuleBlocks(blocks, present_blocks(family.configs().unet), model)
    raise LoRAFileError(f"--lbws: {lora.name}'s U-Net modules are not those of any {style or 'SD 1.x / 2.x / SDXL'} "
                        f"U-Net, so their blocks are unknown: {short_list(sorted(unet_names), 6)}")


def _families_named_like(style: str | None) -> list[ModelFamily]:
    """The families whose LoRA names have this style (name_style's "SDXL" / "SD 1.x / 2.x"; all when unknown)."""
    if style is None:
        return list(FAMILIES.values())
    return [f for f in FAMILIES.values() if f.arch.startswith("sdxl") == (style == "SDXL")]


@lru_cache(maxsize=None)
def family_unet_blocks(family_name: str) -> dict[str, int]:
    """LoRA module name -> block for every LoRA / LoCon layer of the family's full-size U-Net (built on the meta
    device: structure only). Read-only: cached."""
    from diffusers import UNet2DConditionModel

    config = FAMILIES[family_name].configs().unet
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    paths = {id(module): path for path, module in unet.named_modules()}
    return {name: layer_block("unet", paths[id(module)], config)
            for name, module in unet_targets(unet, conv=True).items()}


# ------------------------------------------------------------------------------------------ the weights


def module_block_weights(loras: list[LoRAFile], lbws: list[BlockWeights] | None,
                         checkpoint: SDCheckpoint | None = None) -> list[dict[str, float]] | None:
    """Per LoRA, its modules' block weights (None without --lbws); blocks from `checkpoint` when merging into one.
    Logs each LoRA's resolved weights, and warns when a weight other than 1 is given for a block the model lacks."""
    if lbws is None:
        return None
    tables = (checkpoint_module_blocks(checkpoint, loras) if checkpoint is not None
              else [lora_module_blocks(lora) for lora in loras])
    result = []
    for lora, weights, table in zip(loras, lbws, tables):
        logger.info("--lbws for %s: %s", lora.name, weights)
        _warn_absent_blocks(lora, weights, table)
        result.append({name: weights[table.blocks[name]] for name in lora.modules})
    return result


def _warn_absent_blocks(lora: LoRAFile, weights: BlockWeights, table: ModuleBlocks) -> None:
    absent = [f"{BLOCKS[b]}={weights[b]:g}" for b in range(len(BLOCKS)) if weights[b] != 1 and b not in table.present]
    if absent:
        # kohya ignores them silently; a weight for a block that does not exist is most likely a preset meant for
        # another model (26 values on SDXL, whose blocks stop at IN08 / OUT08: use its 20-value table).
        logger.warning("--lbws for %s gives %s, but %s has no such block(s): those values change nothing",
                       lora.name, ", ".join(absent), table.model)


def weighted_terms(loras: list[LoRAFile], ratios: list[float], block_weights: list[dict[str, float]] | None = None,
                   ) -> dict[str, list[tuple[LoRAFactors, float]]]:
    """Per module name, (factors, multiplier) for every LoRA that has it: the LoRA's ratio times the module's block
    weight (1 without --lbws). What the LoRA-into-LoRA merges sum, so a block weight acts exactly as a ratio does."""
    terms: dict[str, list[tuple[LoRAFactors, float]]] = {}
    for i, (lora, ratio) in enumerate(zip(loras, ratios)):
        for name, factors in lora.modules.items():
            weight = block_weights[i][name] if block_weights is not None else 1.0
            terms.setdefault(name, []).append((factors, ratio * weight))
    return terms
