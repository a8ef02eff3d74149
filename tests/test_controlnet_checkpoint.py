"""ControlNet checkpoint I/O: the key table against diffusers' own converter, bit-exact round trips between the
original (lllyasviel / WebUI / ComfyUI) layout and diffusers folders, diffusers as an independent reader of our
original-layout files, refusals that name the problem, and the converter tool end to end."""

from __future__ import annotations

import json

import pytest
import torch

from library.controlnet_checkpoint import (CONTROL_PREFIX, CONTROLNET_FAMILIES, ControlNetCheckpoint, ControlNetFormatError,
                                           controlnet_checkpoint, controlnet_config_for_family, controlnet_key_table,
                                           load_controlnet, read_controlnet, save_controlnet,
                                           save_controlnet_diffusers, save_controlnet_file,
                                           save_controlnet_original)
from library.families import FAMILIES, SD1, SD2_512, SD2_768_V, SDXL, ModelSize
from library.safetensors_io import SafetensorsReader, save_tensors
from library.tensor_files import CheckpointError, LazyTensor
from tools import convert_controlnet


@pytest.fixture(scope="module")
def tiny_controlnets():
    """family name -> a tiny ControlNetModel made the way the trainer makes one (from the tiny U-Net), with every
    tensor perturbed: from_unet zero-initialises the zero convs, and a swapped all-zero pair would go unseen."""
    from diffusers import ControlNetModel

    from library.tiny_models import build_tiny_models

    out = {}
    for i, (name, family) in enumerate(CONTROLNET_FAMILIES.items()):
        model = ControlNetModel.from_unet(build_tiny_models(family, seed=i).unet)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        out[name] = model.eval()
    return out


@pytest.fixture(scope="module")
def tiny_files(tiny_controlnets, tmp_path_factory):
    """family name -> {"diffusers": folder, "original": .safetensors, "single": the family's single file
    (`save_controlnet_file`: the original layout for SD 1.x / 2.x, diffusers names for SDXL)} of the tiny
    ControlNets."""
    root = tmp_path_factory.mktemp("controlnets")
    files = {}
    for name, model in tiny_controlnets.items():
        checkpoint = controlnet_checkpoint(model, family=FAMILIES[name])
        files[name] = {"diffusers": save_controlnet_diffusers(checkpoint, root / f"{name}_diffusers"),
                       "original": save_controlnet_original(checkpoint, root / f"{name}.safetensors"),
                       "single": save_controlnet_file(checkpoint, root / f"{name}_single.safetensors")}
    return files


def file_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a file, read independently of the code under test."""
    if str(path).endswith(".safetensors"):
        with SafetensorsReader(path) as reader:
            return {k: reader.read(k) for k in reader.keys()}
    return torch.load(path, weights_only=True)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def model_keys(config: dict) -> set[str]:
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return set(ControlNetModel.from_config(config).state_dict())


# ----------------------------------------------------------------------------------------------------------
# Key table and configs


@pytest.mark.parametrize("family_name", list(CONTROLNET_FAMILIES))
@pytest.mark.parametrize("size", list(ModelSize))
def test_key_table_covers_every_controlnet_key_one_to_one(family_name, size):
    config = controlnet_config_for_family(FAMILIES[family_name], size)
    table = controlnet_key_table(config)
    diffusers = [m.diffusers[0] for m in table.mappings]
    originals = [m.original for m in table.mappings]
    assert all(len(m.diffusers) == 1 for m in table.mappings)
    assert len(set(diffusers)) == len(diffusers) and set(diffusers) == model_keys(config)
    assert len(set(originals)) == len(originals) and all(k.startswith(CONTROL_PREFIX) for k in originals)
    assert len(table.by_original()) == len(table.by_diffusers()) == len(table.mappings)


@pytest.mark.parametrize("family_name", list(CONTROLNET_FAMILIES))
def test_key_table_agrees_with_diffusers_converter(family_name):
    """diffusers' own original -> diffusers converter (fed names instead of tensors, so full size costs nothing)
    sends every original key of our table to the same diffusers key."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    config = controlnet_config_for_family(FAMILIES[family_name])
    table = controlnet_key_table(config)
    converted = convert_controlnet_checkpoint({m.original: m.original for m in table.mappings}, config)
    ours = {m.diffusers[0]: m.original for m in table.mappings}
    if FAMILIES[family_name].arch == "sdxl":
        # diffusers' converter leaves out SDXL's size/crop embedding; its own name table has it (label_emb.0 <->
        # add_embedding), which our table must match.
        size_crop = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        assert {k: ours.pop(k) for k in size_crop} == {k: CONTROL_PREFIX + v for k, v in size_crop.items()}
    assert converted == ours


def test_key_table_names_follow_the_original_release():
    table = controlnet_key_table(controlnet_config_for_family(SD1)).by_diffusers()
    assert len(table) == 340  # the tensor count of lllyasviel's control_v11*_sd15_*.pth files
    expected = {
        "controlnet_cond_embedding.conv_in.weight": "input_hint_block.0.weight",
        "controlnet_cond_embedding.blocks.0.bias": "input_hint_block.2.bias",
        "controlnet_cond_embedding.blocks.5.weight": "input_hint_block.12.weight",
        "controlnet_cond_embedding.conv_out.weight": "input_hint_block.14.weight",
        "controlnet_down_blocks.0.weight": "zero_convs.0.0.weight",
        "controlnet_down_blocks.11.bias": "zero_convs.11.0.bias",
        "controlnet_mid_block.weight": "middle_block_out.0.weight",
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.3.resnets.1.norm1.weight": "input_blocks.11.0.in_layers.0.weight",
        "down_blocks.2.attentions.1.proj_in.weight": "input_blocks.8.1.proj_in.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.1.time_emb_proj.bias": "middle_block.2.emb_layers.1.bias",
    }
    for name, original in expected.items():
        assert table[name].original == CONTROL_PREFIX + original, name


@pytest.mark.parametrize("family_name", list(CONTROLNET_FAMILIES))
def test_family_config_is_what_from_unet_builds(family_name):
    from diffusers import ControlNetModel, UNet2DConditionModel

    family = FAMILIES[family_name]
    with torch.device("meta"):
        ours = ControlNetModel.from_config(controlnet_config_for_family(family)).config
        unet = UNet2DConditionModel.from_config(family.configs().unet)
        theirs = ControlNetModel.from_unet(unet, load_weights_from_unet=False).config
    assert public(ours) == public(theirs)
    assert ours["use_linear_projection"] is (family.arch in ("sd2", "sdxl"))
    assert ours["upcast_attention"] is (family is SD2_768_V)


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("family_name", list(CONTROLNET_FAMILIES))
def test_diffusers_original_diffusers_is_bit_exact(family_name, tiny_files, tmp_path):
    folder = tiny_files[family_name]["diffusers"]
    with read_controlnet(folder) as checkpoint:
        assert checkpoint.family is FAMILIES[family_name]  # told apart by the config (upcast_attention)
        middle = save_controlnet_original(checkpoint, tmp_path / "mid.safetensors")
    with read_controlnet(middle, family=FAMILIES[family_name]) as checkpoint:
        back = save_controlnet_diffusers(checkpoint, tmp_path / "back")
    assert_same(file_tensors(folder / "diffusion_pytorch_model.safetensors"),
                file_tensors(back / "diffusion_pytorch_model.safetensors"))
    assert json.loads((folder / "config.json").read_text()) == json.loads((back / "config.json").read_text())


@pytest.mark.parametrize("family_name,dtype,variant", [("sd1", torch.float32, "safetensors"),
                                                        ("sd2-512", torch.float16, "safetensors"),
                                                        ("sd2-768-v", torch.float32, "safetensors"),
                                                        ("sd1", torch.float16, "pth_without_prefix"),
                                                        ("sd2-768-v", torch.bfloat16, "pth_without_prefix")])
def test_original_diffusers_original_is_bit_exact(family_name, dtype, variant, tiny_controlnets, tmp_path):
    family = FAMILIES[family_name]
    source = save_controlnet_original(controlnet_checkpoint(tiny_controlnets[family_name], family=family),
                                      tmp_path / "source.safetensors", dtype=dtype)
    expected = file_tensors(source)
    if variant == "pth_without_prefix":  # e.g. thibaud's SD 2.1 ControlNets; lllyasviel's 1.1 files are .pth
        source = tmp_path / "source.pth"
        torch.save({k[len(CONTROL_PREFIX):]: v for k, v in expected.items()}, source)
    with read_controlnet(source, family=family) as checkpoint:
        assert all(t.dtype == dtype for t in checkpoint.tensors.values())
        middle = save_controlnet_diffusers(checkpoint, tmp_path / "mid")
    with read_controlnet(middle, family=family) as checkpoint:
        back = save_controlnet_original(checkpoint, tmp_path / "back.safetensors")
        back_pth = save_controlnet_original(checkpoint, tmp_path / "back.pth")
    assert_same(expected, file_tensors(back))
    assert_same(expected, file_tensors(back_pth))


@pytest.mark.parametrize("family_name", list(CONTROLNET_FAMILIES))
def test_diffusers_reads_our_single_file(family_name, tiny_controlnets, tiny_files):
    """diffusers' ControlNetModel.from_single_file (its own converter, offline, config from our folder) loads the
    single file we write for the family with tensors identical to the source model. (SDXL's original layout is
    not among them: diffusers' converter drops its size/crop embedding.)"""
    from diffusers import ControlNetModel

    loaded = ControlNetModel.from_single_file(str(tiny_files[family_name]["single"]),
                                              config=str(tiny_files[family_name]["diffusers"]),
                                              local_files_only=True)
    assert_same(tiny_controlnets[family_name].state_dict(), loaded.state_dict())


def test_load_controlnet_gives_the_same_model(tiny_controlnets, tiny_files):
    source = tiny_controlnets["sd2-768-v"]
    for path in tiny_files["sd2-768-v"].values():
        model = load_controlnet(path, family=SD2_768_V, base_unet_config=SD2_768_V.configs(ModelSize.TINY).unet)
        assert public(model.config) == public(source.config)
        assert_same(source.state_dict(), model.state_dict())
    half = load_controlnet(tiny_files["sd1"]["original"], family=SD1, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_the_trainer_saves_a_live_model(tiny_controlnets, tiny_files, tmp_path):
    """save_controlnet takes the ControlNetModel itself; the layout follows the path."""
    model = tiny_controlnets["sd2-512"]
    original = save_controlnet(model, tmp_path / "cn.safetensors", family=SD2_512, dtype=torch.float16,
                               metadata={"ss_steps": "5"})
    folder = save_controlnet(model, tmp_path / "cn", dtype=torch.float16)
    assert_same({k: v.half() for k, v in file_tensors(tiny_files["sd2-512"]["original"]).items()},
                file_tensors(original))
    assert_same({k: v.half() for k, v in model.state_dict().items()},
                file_tensors(folder / "diffusion_pytorch_model.safetensors"))
    with SafetensorsReader(original) as reader:
        assert reader.metadata["ss_steps"] == "5"
        assert reader.metadata["modelspec.architecture"] == "stable-diffusion-v2-512/controlnet"


def test_original_metadata(tiny_files, tiny_controlnets, tmp_path):
    with SafetensorsReader(tiny_files["sd2-768-v"]["original"]) as reader:
        metadata = reader.metadata
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/controlnet"
    assert metadata["modelspec.title"] == "sd2-768-v"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1" and metadata["modelspec.date"]
    checkpoint = controlnet_checkpoint(tiny_controlnets["sd1"], family=SD1)
    path = save_controlnet_original(checkpoint, tmp_path / "cn.safetensors",
                                    metadata={"modelspec.title": "my canny", "ss_steps": "100"})
    with read_controlnet(path, family=SD1) as read_back:  # carried through a diffusers folder and back
        folder = save_controlnet_diffusers(read_back, tmp_path / "cn")
    with read_controlnet(folder) as read_back:
        again = save_controlnet_original(read_back, tmp_path / "again.safetensors")
    with SafetensorsReader(again) as reader:
        assert reader.metadata["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
        assert reader.metadata["modelspec.title"] == "my canny" and reader.metadata["ss_steps"] == "100"
        assert "format" not in reader.metadata


# ----------------------------------------------------------------------------------------------------------
# Refusals and tolerated variants


def test_wrong_family_is_refused_with_what_it_looks_like(tiny_files, tmp_path):
    with pytest.raises(ControlNetFormatError, match=r"context dim is 32, so it looks like a tiny test-size SD 1\.x"):
        read_controlnet(tiny_files["sd1"]["original"], family=SD2_512)
    with pytest.raises(CheckpointError, match="does not fit the base model"):
        read_controlnet(tiny_files["sd2-512"]["diffusers"], family=SD1)
    # Full size: only the tensors the config is derived from are needed to be refused.
    probes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "input_hint_block.0.weight": (16, 3, 3, 3),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)}
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    save_tensors(path, {CONTROL_PREFIX + k: torch.zeros(s, dtype=torch.float16) for k, s in probes.items()})
    with pytest.raises(CheckpointError, match=r"context dim is 768, so it looks like an SD 1\.x ControlNet; the "
                                              r"base model's is 1024 \(an SD 2\.x\)"):
        read_controlnet(path, family=SD2_768_V)


def test_family_detection_without_a_base(tiny_files):
    with read_controlnet(tiny_files["sd1"]["original"]) as checkpoint:
        assert checkpoint.family is SD1
    with pytest.raises(CheckpointError, match="sd2-512, sd2-768-v"):  # SD 2.x base vs 768-v: the user must say
        read_controlnet(tiny_files["sd2-512"]["original"])


def edited_original(source, dest, *, add=None, drop=()):
    tensors = file_tensors(source)
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    save_tensors(dest, tensors)
    return dest


def test_unknown_and_missing_keys_are_named(tiny_files, tmp_path):
    source = tiny_files["sd1"]["original"]
    unknown = edited_original(source, tmp_path / "unknown.safetensors",
                              add={CONTROL_PREFIX + "zero_convs.12.0.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"unknown ControlNet tensor\(s\): control_model\.zero_convs\.12\.0"):
        read_controlnet(unknown, family=SD1)
    missing = edited_original(source, tmp_path / "missing.safetensors",
                              drop=[CONTROL_PREFIX + "middle_block_out.0.bias"])
    with pytest.raises(CheckpointError, match=r"missing: control_model\.middle_block_out\.0\.bias"):
        read_controlnet(missing, family=SD1)
    stray = edited_original(source, tmp_path / "stray.safetensors", add={"lora_unet_foo.alpha": torch.ones(())})
    with pytest.raises(CheckpointError, match="unknown tensor.*lora_unet_foo.alpha"):
        read_controlnet(stray, family=SD1)


def test_controlnet_1_0_file_with_a_bundled_sd_model(tiny_files, tmp_path):
    """ControlNet 1.0 releases hold the whole SD model beside control_model.*: that part is set aside."""
    path = edited_original(tiny_files["sd1"]["original"], tmp_path / "control_sd15_canny.safetensors", add={
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2), "first_stage_model.decoder.conv_in.bias":
        torch.ones(2), "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2),
        "betas": torch.ones(3)})
    with read_controlnet(path, family=SD1) as checkpoint, read_controlnet(tiny_files["sd1"]["original"]) as plain:
        assert checkpoint.tensors.keys() == plain.tensors.keys()


def test_diffusers_named_single_file(tiny_files, tmp_path):
    """A diffusers-named ControlNet passed around as a lone .safetensors: read with the family's config."""
    weights = file_tensors(tiny_files["sd2-512"]["diffusers"] / "diffusion_pytorch_model.safetensors")
    save_tensors(tmp_path / "lone.safetensors", weights)
    with read_controlnet(tmp_path / "lone.safetensors", family=SD2_512) as checkpoint:
        assert_same(weights, {k: v.load() for k, v in checkpoint.tensors.items()})
        out = save_controlnet_original(checkpoint, tmp_path / "orig.safetensors")
    assert_same(file_tensors(tiny_files["sd2-512"]["original"]), file_tensors(out))


def test_other_files_are_refused(tiny_files, tmp_path):
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.tiny_models import tiny_checkpoint

    sd = save_checkpoint(tiny_checkpoint(SD1), tmp_path / "sd.safetensors", SaveFormat.SAFETENSORS)
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint, not a ControlNet"):
        read_controlnet(sd, family=SD1)
    with pytest.raises(CheckpointError, match="no config.json"):
        read_controlnet(tmp_path, family=SD1)
    good = tiny_files["sd1"]["diffusers"]
    config = json.loads((good / "config.json").read_text())
    weights = file_tensors(good / "diffusion_pytorch_model.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(config, layers_per_block=1)))
    save_tensors(other / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(CheckpointError, match=r"wrong shape: controlnet_down_blocks\.3\.weight"):
        read_controlnet(other)
    (other / "config.json").write_text(json.dumps(config))
    save_tensors(other / "diffusion_pytorch_model.safetensors", dict(weights, extra_head=torch.ones(1)))
    with pytest.raises(CheckpointError, match=r"unknown tensor\(s\) for this ControlNet config: extra_head"):
        read_controlnet(other)
    save_tensors(other / "diffusion_pytorch_model.safetensors",
                 {k: v for k, v in weights.items() if k != "controlnet_mid_block.bias"})
    with pytest.raises(CheckpointError, match=r"missing: controlnet_mid_block\.bias"):
        read_controlnet(other)
    (other / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel, not a ControlNetModel"):
        read_controlnet(other)


# ----------------------------------------------------------------------------------------------------------
# The converter tool


def test_tool_both_directions(tiny_files, tiny_controlnets, tmp_path, capsys):
    source = tiny_files["sd1"]["original"]
    folder = tmp_path / "out_diffusers"
    assert convert_controlnet.main([str(source), str(folder), "--base_family", "sd1"]) == 0
    assert_same(tiny_controlnets["sd1"].state_dict(), file_tensors(folder / "diffusion_pytorch_model.safetensors"))
    back = tmp_path / "back_fp16.safetensors"
    assert convert_controlnet.main([str(folder), str(back), "--save_precision", "fp16"]) == 0
    expected = {k: v.half() for k, v in file_tensors(source).items()}
    assert_same(expected, file_tensors(back))
    with SafetensorsReader(back) as reader:
        assert reader.metadata["modelspec.architecture"] == "stable-diffusion-v1/controlnet"

    assert convert_controlnet.main([str(source), str(tmp_path / "x"), "--base_family", "sd2-512"]) == 2
    assert "looks like a tiny test-size SD 1.x ControlNet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert convert_controlnet.main([str(source), str(tmp_path / "x.bin")]) == 2
    assert "use .safetensors" in capsys.readouterr().err
    assert convert_controlnet.main([str(folder), str(folder / "inside.safetensors")]) == 2
    assert "inside the input" in capsys.readouterr().err


def test_tool_base_model_sets_the_config(tiny_files, tmp_path):
    """--base_model: the config comes from the base model's own U-Net (768-v: upcast attention)."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.tiny_models import tiny_checkpoint

    base = save_checkpoint(tiny_checkpoint(SD2_768_V), tmp_path / "base.safetensors", SaveFormat.SAFETENSORS)
    out = tmp_path / "cn"
    assert convert_controlnet.main([str(tiny_files["sd2-768-v"]["original"]), str(out),
                                    "--base_model", str(base)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["upcast_attention"] is True and config["use_linear_projection"] is True
    assert config == json.loads((tiny_files["sd2-768-v"]["diffusers"] / "config.json").read_text())


def test_checkpoint_type_is_lazy(tiny_files):
    with read_controlnet(tiny_files["sd1"]["original"], family=SD1) as checkpoint:
        assert isinstance(checkpoint, ControlNetCheckpoint)
        assert all(isinstance(t, LazyTensor) for t in checkpoint.tensors.values())
        assert checkpoint.config["_class_name"] == "ControlNetModel"
        assert checkpoint.config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]


# ----------------------------------------------------------------------------------------------------------
# SDXL: diffusers names in the single file, and the other layouts in circulation


def test_sdxl_single_file_has_diffusers_names_and_modelspec(tiny_controlnets, tiny_files):
    """What the WebUI extension and ComfyUI recognise as an SDXL ControlNet: diffusers' names (both look for
    `controlnet_cond_embedding.conv_in.weight`), every tensor of the model, with SDXL's modelspec."""
    with SafetensorsReader(tiny_files["sdxl"]["single"]) as reader:
        keys, metadata = set(reader.keys()), reader.metadata
    assert keys == set(tiny_controlnets["sdxl"].state_dict())
    assert "controlnet_cond_embedding.conv_in.weight" in keys and "add_embedding.linear_1.weight" in keys
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/controlnet"
    assert_same(file_tensors(tiny_files["sdxl"]["single"]), tiny_controlnets["sdxl"].state_dict())


def test_sdxl_is_detected_from_any_layout(tiny_controlnets, tiny_files):
    """No family given: the SDXL context width (tiny: 80) tells it, in each layout; the original layout keeps the
    size/crop embedding as `label_emb` (as ComfyUI's loader reads it)."""
    with SafetensorsReader(tiny_files["sdxl"]["original"]) as reader:
        assert CONTROL_PREFIX + "label_emb.0.0.weight" in set(reader.keys())
    for path in tiny_files["sdxl"].values():
        with read_controlnet(path) as checkpoint:
            assert checkpoint.family is SDXL
            assert_same(tiny_controlnets["sdxl"].state_dict(), {k: v.load() for k, v in checkpoint.tensors.items()})


def test_kohya_sdxl_controlnet_file_is_read(tiny_controlnets, tiny_files, tmp_path):
    """kohya's sdxl_train_control_net.py saves the copied U-Net encoder under the original names without prefix
    (`input_blocks.*`, `label_emb.*`) and the added modules under diffusers' names (`controlnet_down_blocks.*`)."""
    original = file_tensors(tiny_files["sdxl"]["original"])
    ours = tiny_controlnets["sdxl"].state_dict()
    added = {k: v for k, v in ours.items() if k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.",
                                                            "controlnet_mid_block."))}
    kohya = {k[len(CONTROL_PREFIX):]: v for k, v in original.items()
             if not k.startswith(tuple(CONTROL_PREFIX + m for m in ("input_hint_block.", "zero_convs.",
                                                                    "middle_block_out.")))}
    assert len(kohya) + len(added) == len(ours)
    save_tensors(tmp_path / "kohya.safetensors", {**kohya, **added})
    with read_controlnet(tmp_path / "kohya.safetensors", family=SDXL) as checkpoint:
        assert_same(ours, {k: v.load() for k, v in checkpoint.tensors.items()})
    del kohya["label_emb.0.2.bias"]
    save_tensors(tmp_path / "broken.safetensors", {**kohya, **added})
    with pytest.raises(CheckpointError, match=r"missing: label_emb\.0\.2\.bias"):
        read_controlnet(tmp_path / "broken.safetensors", family=SDXL)


def test_tool_converts_sdxl_controlnets(tiny_files, tiny_controlnets, tmp_path):
    """SDXL: the original layout (detected, no --base_family needed) -> diffusers folder -> the single file SDXL
    users share (diffusers' names), every tensor unchanged."""
    folder, single = tmp_path / "xl_diffusers", tmp_path / "xl.safetensors"
    assert convert_controlnet.main([str(tiny_files["sdxl"]["original"]), str(folder)]) == 0
    assert convert_controlnet.main([str(folder), str(single)]) == 0
    expected = tiny_controlnets["sdxl"].state_dict()
    assert_same(expected, file_tensors(folder / "diffusion_pytorch_model.safetensors"))
    assert_same(expected, file_tensors(single))
