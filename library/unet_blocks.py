"""kohya's block numbering of the SDXL U-Net, for per-block learning rates (`sdxl_train.py --block_lr`).

kohya numbers the blocks of the original (Stability) layout: 0 the time and label embeddings, 1-9
`input_blocks.0-8`, 10-12 `middle_block.0-2`, 13-21 `output_blocks.0-8`, 22 `out` (the last norm and convolution).
Our U-Net is diffusers', so each parameter's block is read from its original-layout path, which the U-Net key map
gives (`key_maps.original_unet_module`): the numbering agrees with the checkpoint keys by construction.
"""

from __future__ import annotations

import torch

from library.key_maps import original_unet_module

SDXL_BLOCK_COUNT = 23
_FIRST = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def sdxl_block_of(original_path: str) -> int:
    """The block index (0-22) of an original-layout SDXL U-Net path such as `input_blocks.4.1.proj_in.weight`."""
    head, _, rest = original_path.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "out":
        return 22
    if head in _FIRST:
        return _FIRST[head] + int(rest.split(".")[0])
    raise ValueError(f"{original_path}: not a block of kohya's SDXL U-Net table")


def parse_block_lr(spec: str, flag: str = "--block_lr") -> list[float]:
    """kohya's comma-separated list of 23 learning rates (0 freezes a block)."""
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: expected {SDXL_BLOCK_COUNT} comma-separated numbers") from None
    if len(values) != SDXL_BLOCK_COUNT or any(v < 0 for v in values):
        raise ValueError(f"{flag}: {len(values)} value(s) given; SDXL's U-Net has {SDXL_BLOCK_COUNT} blocks (0: time "
                         "and label embeddings, 1-9: input_blocks, 10-12: middle_block, 13-21: output_blocks, 22: "
                         "out), one non-negative learning rate each, comma-separated (0 freezes a block)")
    return values


def sdxl_block_parameters(unet: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The U-Net's parameters by kohya's SDXL block (23 lists, in model order)."""
    blocks: list[list[torch.nn.Parameter]] = [[] for _ in range(SDXL_BLOCK_COUNT)]
    for name, parameter in unet.named_parameters():
        blocks[sdxl_block_of(original_unet_module(unet.config, name))].append(parameter)
    return blocks
