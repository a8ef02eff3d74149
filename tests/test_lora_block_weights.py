"""kohya's `--lbws` (LoRA block weights) in merge_lora.py, sdxl_merge_lora.py and svd_merge_lora.py
(networks/lora_block_weights.py), on tiny SD 1.x and SDXL models and the full-size U-Net structures (meta device).

The expected block of a module and the expected presets are written here from kohya's rules (sd-scripts'
svd_merge_lora.py: get_lbw_block_index, LAYER12 / 17 / 20 / 26), not taken from our code, which finds blocks through
the U-Net key map instead. Every merge is checked module by module against that expectation: weight 0 leaves the
model's tensor bit for bit, weight 1 gives the plain merge at the LoRA's ratio, weight w the plain merge at ratio * w.

Planted defects, run when this file was written: every U-Net block number shifted by one in `block_of_original`
fails 15 of the 47 tests (the SD 1.x tables raise on "IN12"; the SDXL merges move by 1e5x their tolerance); blocks a
preset leaves out set to 0 instead of 1 fails 4; the block weight squared in LoRA-into-LoRA merges (kohya's
factor-wise merge) fails the 3 LoRA-output tests.
"""

from __future__ import annotations

import functools
import json
import logging
import re

import pytest
import torch

from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES
from library.model_loading import checkpoint_from_models
from library.safetensors_io import save_tensors
from library.sd_checkpoint import read_checkpoint
from library.tiny_models import build_tiny_models
from networks import merge_lora, sdxl_merge_lora, svd_merge_lora
from networks.lora import create_network
from networks.lora_block_weights import (BLOCKS, checkpoint_module_blocks, family_unet_blocks, lora_module_blocks,
                                         present_blocks)
from networks.lora_checkpoint import lora_layers
from networks.lora_files import read_lora_file

RATIO = 0.7
W = 0.5  # the weight that is neither 0 nor 1

# ------------------------------------------------------------------------------ kohya's rules, written out

_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]
KOHYA_PRESETS = {  # the blocks each preset's values go to, in order
    26: ["BASE", *_IN, "MID", *_OUT],
    20: ["BASE", *_IN[:9], "MID", *_OUT[:9]],
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[3:]],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[:6]],
}
_SD_NAME = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
_XL_NAME = re.compile(r"lora_unet_(input|output)_blocks_(\d+)_")


def kohya_block(name: str) -> str:
    """kohya's get_lbw_block_index as block names: text encoders BASE; SD 1.x / 2.x (diffusers names): down block i,
    resnet / attention j -> IN(3i + j + 1), its downsampler -> IN(3(i + 1)); up block i, resnet / attention j ->
    OUT(3i + j), its upsampler -> OUT(3i + 2); mid_block -> MID; SDXL (original names): input_blocks N -> IN N,
    middle_block -> MID, output_blocks N -> OUT N."""
    if name.startswith("lora_te"):
        return "BASE"
    if name.startswith(("lora_unet_mid_block_", "lora_unet_middle_block_")):
        return "MID"
    if m := _XL_NAME.match(name):
        return f"{'IN' if m[1] == 'input' else 'OUT'}{int(m[2]):02d}"
    m = _SD_NAME.match(name)
    assert m, name
    i, kind, j = int(m[2]), m[3], int(m[4])
    if m[1] == "down":
        return f"IN{3 * (i + 1) if kind == 'downsamplers' else 3 * i + j + 1:02d}"
    return f"OUT{3 * i + 2 if kind == 'upsamplers' else 3 * i + j:02d}"


def kohya_weight(name: str, values: list[float]) -> float:
    """The block weight of a module under a preset: blocks the preset leaves out keep 1."""
    return dict(zip(KOHYA_PRESETS[len(values)], values)).get(kohya_block(name), 1.0)


def cyclic(length: int, cycle=(W, 1.0, 0.0)) -> list[float]:
    """W, 1, 0, W, 1, 0, ...: neighbouring blocks always differ, so a module given its neighbour's block shows."""
    return [cycle[i % len(cycle)] for i in range(length)]


def lbws(values: list[float]) -> str:
    return json.dumps(values)


# --------------------------------------------------------------------------------------------- fixtures


@functools.lru_cache(maxsize=None)
def tiny_models(family: str):
    return build_tiny_models(FAMILIES[family], seed=0)


def make_lora(path, family: str, seed: int):
    """A LoCon file of our network on the tiny model (every block that has layers), random lora_up."""
    models = tiny_models(family)
    torch.manual_seed(seed)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, conv_dim="4", conv_alpha="1")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
    network.save_weights(path, None, {"ss_network_module": "networks.lora",
                                      "ss_base_model_version": FAMILIES[family].ss_base_model_version})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """family -> {"base": tiny model file, "a" / "b": LoCon files}, for SD 1.x and SDXL."""
    root = tmp_path_factory.mktemp("lbws")
    made = {}
    for family in ("sd1", "sdxl"):
        base = save_checkpoint(checkpoint_from_models(tiny_models(family)), root / f"{family}.safetensors",
                               SaveFormat.SAFETENSORS)
        made[family] = {"base": base, "a": make_lora(root / f"{family}_a.safetensors", family, seed=1),
                        "b": make_lora(root / f"{family}_b.safetensors", family, seed=2)}
    return made


def deltas(path) -> dict[str, torch.Tensor]:
    return {name: f.delta() for name, f in read_lora_file(path).modules.items()}


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    """max |a - b| <= rel * max |b|."""
    scale = max(b.abs().max().item(), 1e-12)
    diff = (a - b).abs().max().item()
    assert diff <= rel * scale, f"{what}: max diff {diff:.3g}, magnitude {scale:.3g}"


# ---------------------------------------------------------------------------------------- 1. the blocks

SPOT_NAMES = {
    "lora_unet_down_blocks_1_attentions_0_proj_in": "IN04",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": "OUT11",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_2_resnets_1_conv1": "IN08",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_resnets_0_time_emb_proj": "OUT03",
    "lora_unet_mid_block_attentions_0_proj_out": "MID",
    "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k": "IN07",
    "lora_unet_input_blocks_3_0_op": "IN03",
    "lora_unet_output_blocks_2_2_conv": "OUT02",  # SDXL's first upsampler
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
    "lora_unet_middle_block_1_proj_in": "MID",
}


def test_spot_names_are_in_kohyas_blocks():
    for name, block in SPOT_NAMES.items():
        assert kohya_block(name) == block, name  # the rule written above
        family = "sdxl" if _XL_NAME.match(name) or "middle_block" in name else "sd1"
        assert BLOCKS[family_unet_blocks(family)[name]] == block, name  # ours, through the key map


@pytest.mark.parametrize("family", ["sd1", "sd2-512", "sdxl", "sdxl-refiner"])
def test_full_size_unets_every_module_in_kohyas_block(family):
    """Every LoRA / LoCon layer of the full-size U-Net (meta device) is in kohya's block; the blocks with layers
    and the blocks the model has are the real models' (SDXL: input / output blocks 0..8, its 20-value table)."""
    table = family_unet_blocks(family)
    assert len(table) == {"sd1": 278, "sd2-512": 278, "sdxl": 788, "sdxl-refiner": 548}[family]
    for name, block in table.items():
        assert BLOCKS[block] == kohya_block(name), name
    xl = family == "sdxl"
    ins, outs = (_IN[:9], _OUT[:9]) if xl else (_IN, _OUT)
    assert {BLOCKS[b] for b in table.values()} == {*ins[1:], "MID", *outs}  # IN00 (conv_in) has no LoRA layer
    present = {BLOCKS[b] for b in present_blocks(FAMILIES[family].configs().unet)}
    assert present == set(KOHYA_PRESETS[20] if xl else KOHYA_PRESETS[26])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tiny_model_blocks_from_the_model_and_from_the_names_agree_with_kohya(files, family):
    lora = read_lora_file(files[family]["a"])
    by_names = lora_module_blocks(lora)
    with read_checkpoint(files[family]["base"]) as checkpoint:
        [by_model] = checkpoint_module_blocks(checkpoint, [lora])
    assert by_model.blocks.keys() == by_names.blocks.keys() == lora.modules.keys()
    for name in lora.modules:
        assert BLOCKS[by_model.blocks[name]] == BLOCKS[by_names.blocks[name]] == kohya_block(name), name
    ins, outs = (_IN[:9], _OUT[:9]) if family == "sdxl" else (_IN, _OUT)
    assert {BLOCKS[b] for b in by_model.blocks.values()} == {"BASE", *ins[1:], "MID", *outs}


# ------------------------------------------------------------------------------------ 2. into a model


@pytest.mark.parametrize("family,length,tool", [("sd1", 26, merge_lora), ("sdxl", 20, sdxl_merge_lora),
                                                ("sdxl", 12, sdxl_merge_lora)], ids=["sd1-26", "sdxl-20", "sdxl-12"])
def test_merge_into_model_weights_each_block(tmp_path, files, family, length, tool):
    """Per module, with kohya's block and preset: weight 0 leaves the tensor bit for bit; weight 1 equals the plain
    merge at RATIO; weight W equals the plain merge at RATIO * W. Measured: bit-equal (the same float ratio goes
    through the same code); the tolerance, 1e-6 of the tensor's magnitude (8 fp32 ulps), leaves room for forming
    ratio * w * ΔW in another order. The LoRA moves every weight by 1.2e-2 of its magnitude at least (median 0.1),
    so a module given its neighbour's weight (0 / 0.5 / 1: differences >= 0.5) moves by 6e-3 at least, 6000x."""
    base, lora = files[family]["base"], files[family]["a"]
    values = cyclic(length)
    out = {}
    for label, extra, ratio in (("lbws", ["--lbws", lbws(values)], RATIO), ("1", [], RATIO), ("w", [], RATIO * W)):
        out[label] = tmp_path / f"{label}.safetensors"
        assert tool.main(["--sd_model", str(base), "--models", str(lora), "--ratios", str(ratio),
                          "--save_to", str(out[label]), *extra]) == 0
    with read_checkpoint(base) as original, read_checkpoint(out["lbws"]) as merged, \
            read_checkpoint(out["1"]) as plain, read_checkpoint(out["w"]) as plain_w:
        layers = lora_layers(original)
        touched, seen = set(), {0.0: 0, 1.0: 0, W: 0}
        for name in read_lora_file(lora).modules:
            layer = layers[name]
            weight = kohya_weight(name, values)
            got = merged.tensors[layer.component][layer.key].load()
            before = original.tensors[layer.component][layer.key].load()
            if weight == 0:
                assert torch.equal(got, before), name
            else:
                reference = (plain if weight == 1 else plain_w).tensors[layer.component][layer.key].load()
                assert_close(got, reference, 1e-6, name)
                assert (got - before).abs().max() > 1e-4, f"{name}: the LoRA changes nothing"
            seen[weight] += 1
            touched.add((layer.component, layer.key))
        assert all(seen.values()), seen  # every kind of weight was checked
        for component, tensors in original.tensors.items():
            for key, lazy in tensors.items():
                if (component, key) not in touched:
                    assert torch.equal(merged.tensors[component][key].load(), lazy.load()), key


# ------------------------------------------------------------------------------------- 3. into a LoRA


def test_merge_into_lora_concat_weights_each_module(tmp_path, files):
    """LoRA + LoRA (--concat, exact): each module's update is ra * wa * ΔWa + rb * wb * ΔWb, the block weight
    multiplying like the ratio (not squared as kohya's factor-wise merge does). fp32 matmul rounding: 1e-5."""
    a, b = files["sd1"]["a"], files["sd1"]["b"]
    va, vb = cyclic(17, (W, 1.0, 0.0, -1.5)), cyclic(17, (0.0, 2.0, 1.0))
    out = tmp_path / "ab.safetensors"
    assert merge_lora.main(["--models", str(a), str(b), "--ratios", "0.8", "-0.6", "--concat",
                            "--lbws", lbws(va), lbws(vb), "--save_to", str(out)]) == 0
    da, db = deltas(a), deltas(b)
    got = deltas(out)
    assert got.keys() == da.keys()
    for name, delta in got.items():
        want = 0.8 * kohya_weight(name, va) * da[name] - 0.6 * kohya_weight(name, vb) * db[name]
        assert_close(delta, want, 1e-5, name)


def test_merge_one_sdxl_lora_into_a_lora_by_its_names(tmp_path, files):
    """Without a model the blocks come from the names (SDXL's original layout): ratio * w * ΔW per module, w = -0.5
    included (its square would be +0.25). fp32 rounding of the re-scaled factors: 1e-5."""
    lora = files["sdxl"]["a"]
    values = cyclic(20, (-0.5, 1.0, 0.0, 2.0))
    out = tmp_path / "weighted.safetensors"
    assert sdxl_merge_lora.main(["--models", str(lora), "--ratios", str(RATIO), "--lbws", lbws(values),
                                 "--save_to", str(out)]) == 0
    before = deltas(lora)
    for name, delta in deltas(out).items():
        assert_close(delta, RATIO * kohya_weight(name, values) * before[name], 1e-5, name)


def test_svd_merge_weights_each_module(tmp_path, files):
    """svd_merge_lora at a rank that holds the whole sum (4 + 4), no clipping: the sum of ratio * w * ΔW exactly
    (fp32 SVD rounding: 1e-5), modules at weight 0 in both inputs are zero."""
    a, b = files["sdxl"]["a"], files["sdxl"]["b"]
    va, vb = cyclic(12, (1.0, 0.0, W)), cyclic(12, (0.0, 1.0, 0.0, -2.0))
    out = tmp_path / "svd.safetensors"
    assert svd_merge_lora.main(["--models", str(a), str(b), "--ratios", "0.9", "0.4", "--new_rank", "8",
                                "--new_conv_rank", "8", "--clamp_quantile", "1", "--lbws", lbws(va), lbws(vb),
                                "--save_to", str(out)]) == 0
    da, db = deltas(a), deltas(b)
    for name, delta in deltas(out).items():
        want = 0.9 * kohya_weight(name, va) * da[name] + 0.4 * kohya_weight(name, vb) * db[name]
        assert_close(delta, want, 1e-5, name)


# ------------------------------------------------------------------------------ 4. logs and bad inputs


def test_weights_are_logged_and_blocks_sdxl_lacks_are_warned_about(tmp_path, files, caplog):
    """26 values on SDXL: the values for IN09..IN11 / OUT09..OUT11 change nothing; those other than 1 are named."""
    values = [1.0] * 26
    values[10], values[25] = 0.5, 0.0  # IN09, OUT11
    out = tmp_path / "out.safetensors"
    with caplog.at_level(logging.INFO):
        assert sdxl_merge_lora.main(["--sd_model", str(files["sdxl"]["base"]), "--models", str(files["sdxl"]["a"]),
                                     "--lbws", lbws(values), "--save_to", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--lbws" in r.getMessage()]
    assert len(warnings) == 1 and "IN09=0.5, OUT11=0" in warnings[0] and "no such block" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "--lbws for" in r.getMessage()]
    assert len(infos) == 1 and "BASE=1 IN00=1" in infos[0] and "IN09=0.5" in infos[0] and "OUT11=0" in infos[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # SDXL's own table: nothing to warn about
        assert sdxl_merge_lora.main(["--models", str(files["sdxl"]["a"]), "--lbws", lbws(cyclic(20)),
                                     "--save_to", str(tmp_path / "lora.safetensors")]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "--lbws" in r.getMessage()]


ONES12 = lbws([1] * 12)
BAD_LBWS = [  # (--lbws values, what the message must name)
    (["[1,0"], ["'[1,0'", "JSON list"]),
    (["1"], ["'1'", "JSON list"]),
    ([json.dumps(["a"] * 12)], ["JSON list"]),
    ([json.dumps([True] * 12)], ["JSON list"]),
    ([json.dumps([1] * 11 + [float("nan")])], ["NaN", "finite"]),
    ([lbws([1] * 25)], ["25 values", "allowed lengths"]),
    ([], ["0 list(s) for 1 model(s)"]),
    ([ONES12, ONES12], ["2 list(s) for 1 model(s)"]),
]


@pytest.mark.parametrize("tool_name", ["merge_lora-model", "merge_lora-lora", "svd_merge_lora", "sdxl_merge_lora"])
@pytest.mark.parametrize("values,expected", BAD_LBWS, ids=["not-json", "not-a-list", "strings", "booleans", "nan",
                                                          "length-25", "none", "two-for-one"])
def test_bad_lbws_are_refused_naming_the_flag(tmp_path, files, capsys, tool_name, values, expected):
    out = tmp_path / "out.safetensors"
    family = "sdxl" if tool_name == "sdxl_merge_lora" else "sd1"
    model = ["--sd_model", str(files[family]["base"])] if tool_name.endswith("model") or family == "sdxl" else []
    tool = {"svd_merge_lora": svd_merge_lora, "sdxl_merge_lora": sdxl_merge_lora}.get(tool_name, merge_lora)
    assert tool.main([*model, "--models", str(files[family]["a"]), "--lbws", *values, "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lbws") and err.count("\n") == 1, err  # one line
    assert "12, 17, 20, 26" in err and all(e in err for e in expected), err
    assert not out.exists()


def test_lists_of_different_lengths_and_unknown_modules_are_refused(tmp_path, files, capsys):
    out = tmp_path / "out.safetensors"
    a, b = str(files["sd1"]["a"]), str(files["sd1"]["b"])
    for argv in (["--models", a, b], ["--sd_model", str(files["sd1"]["base"]), "--models", a, b]):
        assert merge_lora.main([*argv, "--lbws", ONES12, lbws([1] * 17), "--save_to", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--lbws" in err and "different lengths (12, 17)" in err and "12, 17, 20, 26" in err
    # A U-Net module no SD U-Net has: its block is unknown (a LoRA-only merge without --lbws takes it).
    bogus = tmp_path / "bogus.safetensors"
    save_tensors(bogus, {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                         "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)})
    assert svd_merge_lora.main(["--models", str(bogus), "--lbws", ONES12, "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--lbws" in err and "lora_unet_down_blocks_9_attentions_0_proj_in" in err and "blocks are unknown" in err
    # Into a model, a LoRA of another family is refused as without --lbws, even when its blocks are at weight 0.
    assert merge_lora.main(["--sd_model", str(files["sd1"]["base"]), "--models", str(files["sdxl"]["a"]),
                            "--lbws", lbws([0] * 12), "--save_to", str(out)]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert not out.exists()
