"""Families whose U-Net takes more than the noisy latents: SD 1.x / 2.x / SDXL inpainting, SD 2.x depth and the
"extra channels" families of models made with tools/add_input_channels.py.

The checks test_checkpoint_roundtrip.py and test_model_loading.py make for the text-to-image families, made here on
each variant: key tables, bit-exact round trips between the formats, detection from the weights, modelspec
metadata, and diffusers as an independent reader (from_single_file with our config folder, from_pretrained, U-Net
outputs). Then what is the variants' own: SD 2.x depth's MiDaS part, widths no family has, folders whose pipeline
class does not match the U-Net, and the tools that do not feed such a U-Net yet.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from library import key_maps
from library.checkpoint_writer import SaveFormat, save_checkpoint, write_config_folder
from library.families import (FAMILIES, INPAINTING, SD1_INPAINTING, SD2_512_DEPTH, SDXL_REFINER, TEXT_TO_IMAGE,
                              ModelSize, PredictionType, family_for)
from library.key_maps import key_table
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import EXTRAS_FILE, read_checkpoint, require_arch
from library.tensor_files import CheckpointError
from tests.conftest import VARIANT_NAMES
from tests.numerics import assert_outputs_close
from tests.test_checkpoint_roundtrip import (assert_original_round_trip, assert_same_tensors, hints_for,
                                             original_file_tensors)

CONV_IN = key_maps.UNET_PREFIX + "input_blocks.0.0.weight"
RELEASED = ["sd1-inpainting", "sd2-512-inpainting", "sd2-512-depth", "sdxl-inpainting"]


def base_of(family):
    """The text-to-image family a variant widens."""
    return family_for(family.arch, family.prediction_type)


def tables(family, configs):
    slots = {slot.component: slot for slot in family.text_encoders}
    return {c: key_table(c, configs.of(c), slots.get(c)) for c in family.components}


# ----------------------------------------------------------------------------------------------------------
# The records and their key tables


def test_every_variant_is_its_base_with_wider_inputs():
    for name in VARIANT_NAMES:
        family, base = FAMILIES[name], base_of(FAMILIES[name])
        assert base.unet_inputs == TEXT_TO_IMAGE and family.arch == base.arch
        assert family.text_encoders == base.text_encoders and family.prediction_type is base.prediction_type
        new, old = family.configs(), base.configs()
        assert new.unet == dict(old.unet, in_channels=family.unet_inputs.new_model_channels), name
        assert (new.vae, new.text_encoders, new.scheduler) == (old.vae, old.text_encoders, old.scheduler)
        assert family.modelspec_architecture != base.modelspec_architecture
        assert family.unet_inputs.parts[0] == TEXT_TO_IMAGE.parts[0]  # the noisy latents first, as pipelines feed them


def test_released_layouts_follow_diffusers_channel_order():
    """diffusers' inpainting pipelines feed torch.cat([latents, mask, masked_image_latents], dim=1) to a 9-channel
    U-Net, depth2img torch.cat([latents, depth], dim=1); the records say the same, with the same widths."""
    import inspect

    from diffusers import (StableDiffusionDepth2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionXLInpaintPipeline)

    for cls in (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline):
        assert "torch.cat([latent_model_input, mask, masked_image_latents], dim=1)" in inspect.getsource(cls.__call__)
    assert "torch.cat([latent_model_input, depth_mask], dim=1)" in inspect.getsource(
        StableDiffusionDepth2ImgPipeline.__call__)
    assert [(p.what, p.channels) for p in INPAINTING.parts] == [("noisy latents", 4), ("mask", 1),
                                                                 ("masked-image latents", 4)]
    assert [(p.what, p.channels) for p in SD2_512_DEPTH.unet_inputs.parts] == [("noisy latents", 4), ("depth map", 1)]


@pytest.mark.parametrize("family_name", RELEASED)
def test_full_size_keys_are_the_released_files_keys(family_name):
    """The released files have their text-to-image model's keys, conv_in wider: RunwayML's sd-v1-5-inpainting,
    512-inpainting-ema, 512-depth-ema (plus MiDaS, an original part) and SDXL inpainting 0.1 have conv_in
    [320, 9 or 5, 3, 3]."""
    family = FAMILIES[family_name]
    ours, theirs = tables(family, family.configs()), tables(base_of(family), base_of(family).configs())
    for component in family.components:
        shapes = {m.original: m.original_shape for m in ours[component].mappings}
        base_shapes = {m.original: m.original_shape for m in theirs[component].mappings}
        assert shapes.keys() == base_shapes.keys(), component
        changed = {k for k in shapes if shapes[k] != base_shapes[k]}
        assert changed == ({CONV_IN} if component == "unet" else set()), component
    conv_in = {m.original: m.original_shape for m in ours["unet"].mappings}[CONV_IN]
    assert conv_in == (320, 9 if family.unet_inputs == INPAINTING else 5, 3, 3)


# ----------------------------------------------------------------------------------------------------------
# Round trips and detection


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
@pytest.mark.parametrize("first,second", [("safetensors", "diffusers_safetensors"), ("ckpt", "diffusers"),
                                          ("safetensors", "ckpt")])
def test_original_round_trip_is_bit_exact(family_name, first, second, variant_files, tmp_path):
    """original -> other format -> original: same key set (SD 2.x depth's MiDaS part too), identical tensors."""
    assert_original_round_trip(variant_files[family_name][first], family_name, first, second, tmp_path,
                               check_family=True)


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_diffusers_round_trip_is_bit_exact(family_name, variant_files, tmp_path):
    """diffusers -> original -> diffusers: same family, configs, keys and tensors."""
    source = variant_files[family_name]["diffusers_safetensors"]
    with read_checkpoint(source) as checkpoint:
        middle = save_checkpoint(checkpoint, tmp_path / "mid.safetensors", SaveFormat.SAFETENSORS)
    with read_checkpoint(middle) as checkpoint:
        back = save_checkpoint(checkpoint, tmp_path / "back", SaveFormat.DIFFUSERS_SAFETENSORS)
    with read_checkpoint(source) as a, read_checkpoint(back) as b:
        assert a.family is b.family is FAMILIES[family_name] and a.configs == b.configs
        assert_same_tensors(a, b)


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_every_format_reads_back_as_the_model_written(family_name, variant_checkpoints, variant_files):
    family = FAMILIES[family_name]
    for fmt, path in variant_files[family_name].items():
        with read_checkpoint(path, hints_for(family_name, fmt)) as checkpoint:
            assert checkpoint.family is family, fmt
            assert checkpoint.configs.unet["in_channels"] == family.unet_inputs.new_model_channels
            assert_same_tensors(variant_checkpoints[family_name], checkpoint)
    with read_checkpoint(variant_files[family_name]["ckpt"]) as checkpoint:  # no metadata, no flag: epsilon
        assert checkpoint.family is family_for(family.arch, PredictionType.EPSILON, family.unet_inputs)


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_safetensors_modelspec_names_what_the_file_is(family_name, variant_files):
    family = FAMILIES[family_name]
    with SafetensorsReader(variant_files[family_name]["safetensors"]) as reader:
        meta = reader.metadata
    assert meta["modelspec.architecture"] == family.modelspec_architecture
    assert meta["modelspec.prediction_type"] == family.prediction_type.modelspec_name
    assert meta["modelspec.resolution"] == f"{family.default_resolution}x{family.default_resolution}"
    expected = {"sd1-inpainting": "stable-diffusion-v1/inpaint", "sd2-512-inpainting": "stable-diffusion-v2-inpainting",
                "sd2-512-depth": "stable-diffusion-v2-depth", "sdxl-inpainting": "stable-diffusion-xl-v1-base/inpaint",
                "sd2-768-v-extra": "stable-diffusion-v2-768-v/extra-channels"}
    if family_name in expected:
        assert meta["modelspec.architecture"] == expected[family_name]


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_folder_is_the_familys_pipeline(family_name, variant_files):
    family = FAMILIES[family_name]
    index = json.loads((variant_files[family_name]["diffusers"] / "model_index.json").read_text())
    unet = json.loads((variant_files[family_name]["diffusers"] / "unet" / "config.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    assert unet["in_channels"] == family.unet_inputs.new_model_channels
    assert all(index[absent] == [None, None] for absent in family.pipeline_absent)


# ----------------------------------------------------------------------------------------------------------
# Diffusers as an independent reader


def single_file_reader(family):
    """The diffusers class that reads the family's single file with our config folder: its pipeline, except
    StableDiffusionDepth2ImgPipeline, which has no from_single_file: StableDiffusionPipeline then reads the same
    components (the U-Net's in_channels come from the config folder)."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_class)
    return cls if hasattr(cls, "from_single_file") else diffusers.StableDiffusionPipeline


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_diffusers_from_single_file_reads_our_file(family_name, fmt, variant_files, tmp_path):
    family = FAMILIES[family_name]
    with read_checkpoint(variant_files[family_name]["diffusers_safetensors"]) as source:
        config_dir = tmp_path / "config"
        write_config_folder(source, config_dir)
        pipe = single_file_reader(family).from_single_file(str(variant_files[family_name][fmt]),
                                                           config=str(config_dir), local_files_only=True)
        for component in family.components:
            loaded = getattr(pipe, component).state_dict()
            loaded.pop("embeddings.position_ids", None)
            expected = source.tensors[component]
            assert loaded.keys() == expected.keys(), component
            for key, lazy in expected.items():
                assert torch.equal(loaded[key], lazy.load()), f"{component}.{key}"
    assert pipe.unet.config.in_channels == family.unet_inputs.new_model_channels
    assert pipe.scheduler.config.prediction_type == family.prediction_type.value


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_diffusers_unet_from_single_file_with_our_config(family_name, variant_files, variant_checkpoints, tmp_path):
    """The model-level reader too: UNet2DConditionModel.from_single_file(file, config=<our folder>)."""
    from diffusers import UNet2DConditionModel

    write_config_folder(variant_checkpoints[family_name], tmp_path / "config")
    unet = UNet2DConditionModel.from_single_file(str(variant_files[family_name]["safetensors"]),
                                                 config=str(tmp_path / "config"), subfolder="unet",
                                                 local_files_only=True)
    expected = variant_checkpoints[family_name].tensors["unet"]
    assert unet.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key].load()) for key, value in unet.state_dict().items())


@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_diffusers_from_pretrained_reads_our_folder(family_name, variant_checkpoints, variant_files):
    """The family's pipeline loads our folder; the components a folder leaves empty (SD 2.x depth's depth
    estimator and its image processor, which depth2img requires) are passed as None, as a user passes their own."""
    import diffusers

    family = FAMILIES[family_name]
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        str(variant_files[family_name]["diffusers_safetensors"]), local_files_only=True,
        **{absent: None for absent in family.pipeline_absent})
    expected = variant_checkpoints[family_name]
    for component in family.components:
        loaded = getattr(pipe, component).state_dict()
        loaded.pop("embeddings.position_ids", None)
        assert loaded.keys() == expected.tensors[component].keys()
        for key, lazy in expected.tensors[component].items():
            assert torch.equal(loaded[key], lazy.load()), f"{component}.{key}"
    assert pipe.scheduler.config.prediction_type == family.prediction_type.value


@pytest.mark.numbers
@pytest.mark.parametrize("family_name", VARIANT_NAMES)
def test_unet_outputs_match_diffusers_on_every_input_channel(family_name, variant_files):
    """Our U-Net from the single file computes what diffusers' from our folder computes, with every input channel
    fed; and the channels beyond the latents matter (the tiny models' conv_in weights are not zero)."""
    import diffusers

    from library.model_loading import instantiate_component

    family = FAMILIES[family_name]
    with read_checkpoint(variant_files[family_name]["safetensors"]) as checkpoint:
        ours = instantiate_component(checkpoint, "unet")
    theirs = getattr(diffusers, family.pipeline_class).from_pretrained(
        str(variant_files[family_name]["diffusers_safetensors"]), local_files_only=True,
        **{absent: None for absent in family.pipeline_absent}).unet
    generator = torch.Generator().manual_seed(0)
    config = ours.config
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.rand(1, 6, generator=generator) * 1024}}
    with torch.no_grad():
        out = ours(sample, 500, context, **added).sample
        assert_outputs_close(out, theirs(sample, 500, context, **added).sample, what=f"{family_name} U-Net")
        other = sample.clone()
        other[:, 4:] = torch.randn(other[:, 4:].shape, generator=generator)
        assert not torch.allclose(ours(other, 500, context, **added).sample, out)
    assert out.shape[1] == 4  # the U-Net predicts the noise of the 4 latent channels only


# ----------------------------------------------------------------------------------------------------------
# SD 2.x depth's MiDaS part


def test_depth_files_midas_part_is_carried_through_every_format(variant_files, tmp_path):
    """The depth estimator under `depth_model.` is no diffusers model's: a folder keeps it beside the models and a
    single file written from the folder has it again, byte for byte (WebUI tells depth models by it)."""
    original = original_file_tensors(variant_files["sd2-512-depth"]["safetensors"])
    midas = {k: v for k, v in original.items() if k.startswith("depth_model.")}
    assert "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in midas
    with SafetensorsReader(variant_files["sd2-512-depth"]["diffusers_safetensors"] / EXTRAS_FILE) as reader:
        assert set(midas) <= set(reader.keys())
    for fmt in ("diffusers", "ckpt"):
        with read_checkpoint(variant_files["sd2-512-depth"][fmt]) as checkpoint:
            back = original_file_tensors(save_checkpoint(checkpoint, tmp_path / f"{fmt}.safetensors",
                                                         SaveFormat.SAFETENSORS))
        assert all(torch.equal(back[k], v) for k, v in midas.items()), fmt


def test_depth_file_without_midas_part_is_written_with_a_warning(variant_checkpoints, tmp_path, caplog):
    from dataclasses import replace

    checkpoint = variant_checkpoints["sd2-512-depth"]
    without = replace(checkpoint, extras={k: v for k, v in checkpoint.extras.items()
                                          if not k.startswith("depth_model.")})
    with caplog.at_level(logging.WARNING):
        path = save_checkpoint(without, tmp_path / "depth.safetensors", SaveFormat.SAFETENSORS)
    assert "depth_model.*" in caplog.text and "WebUI" in caplog.text
    with read_checkpoint(path) as back:  # still a depth model: the width says so
        assert back.family is SD2_512_DEPTH


def test_midas_keys_are_unknown_to_a_text_to_image_model(tiny_files, tmp_path):
    tensors = original_file_tensors(tiny_files["sd2-512"]["safetensors"])
    tensors["depth_model.model.scratch.layer1_rn.weight"] = torch.zeros(8, 8, 3, 3)
    save_tensors(tmp_path / "odd.safetensors", tensors)
    with pytest.raises(CheckpointError, match="unknown tensor.*depth_model.model.scratch.layer1_rn.weight"):
        read_checkpoint(tmp_path / "odd.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Widths, folders, and tools that do not feed these U-Nets yet


@pytest.mark.parametrize("family_name,width,needles", [
    ("sd1", 3, ["3 input channels", "SD 1.x", "4 (text-to-image)", "4 + N (extra channels)", "9 (inpainting)"]),
    ("sdxl-refiner", 9, ["9 input channels", "SDXL refiner", "4 (text-to-image)"]),
])
def test_a_width_no_family_has_is_refused(family_name, width, needles, tiny_files, tmp_path):
    tensors = original_file_tensors(tiny_files[family_name]["safetensors"])
    out_channels, _, k, _ = tensors[CONV_IN].shape
    tensors[CONV_IN] = torch.zeros(out_channels, width, k, k)
    save_tensors(tmp_path / "odd.safetensors", tensors)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "odd.safetensors")
    assert all(needle in str(error.value) for needle in [str(tmp_path / "odd.safetensors"), *needles]), error.value


def test_the_unet_width_decides_not_the_pipeline_class(variant_files, tiny_files, tmp_path):
    """Older conversions wrote inpainting models as StableDiffusionPipeline folders, and diffusers' inpainting
    pipelines also run plain models: a folder's family follows its U-Net's in_channels."""
    import shutil

    inpainting = shutil.copytree(variant_files["sd1-inpainting"]["diffusers_safetensors"], tmp_path / "inpainting")
    plain = shutil.copytree(tiny_files["sd1"]["diffusers_safetensors"], tmp_path / "plain")
    for folder, class_name in ((inpainting, "StableDiffusionPipeline"), (plain, "StableDiffusionInpaintPipeline")):
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name=class_name)))
    with read_checkpoint(inpainting) as checkpoint:
        assert checkpoint.family is SD1_INPAINTING
    with read_checkpoint(plain) as checkpoint:
        assert checkpoint.family is FAMILIES["sd1"]


def test_tools_that_feed_only_the_latents_refuse_by_name(variant_files, tiny_files):
    with read_checkpoint(variant_files["sd1-inpainting"]["safetensors"]) as checkpoint:
        with pytest.raises(CheckpointError) as error:
            require_arch(checkpoint, "train_controlnet.py")
    message = str(error.value)
    for needle in ("sd1-inpainting.safetensors", "Stable Diffusion 1.x inpainting", "9 input channels",
                   "4 noisy latents, 1 mask, 4 masked-image latents", "train_controlnet.py does not feed",
                   "train_network.py, train_db.py"):
        assert needle in message, message
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        require_arch(checkpoint, "train_controlnet.py")  # the text-to-image model passes
        require_arch(checkpoint, "train_network.py", inputs=(TEXT_TO_IMAGE, INPAINTING))
    with read_checkpoint(variant_files["sd1-inpainting"]["safetensors"]) as checkpoint:
        require_arch(checkpoint, "a tool that feeds both", inputs=(TEXT_TO_IMAGE, INPAINTING))


def test_controlnet_families_are_the_text_to_image_ones():
    from library.controlnet_checkpoint import CONTROLNET_FAMILIES

    assert list(CONTROLNET_FAMILIES) == ["sd1", "sd2-512", "sd2-768-v", "sdxl"]
    assert SDXL_REFINER.name not in CONTROLNET_FAMILIES


def test_tiny_variant_models_come_from_the_make_tiny_model_tool(tmp_path):
    from tools.make_tiny_model import main as make_main

    for name in RELEASED:
        assert make_main(["--family", name, str(tmp_path / f"{name}.safetensors")]) == 0
        with read_checkpoint(tmp_path / f"{name}.safetensors") as checkpoint:
            assert checkpoint.family.name == name
    sizes = {name: FAMILIES[name].configs(ModelSize.TINY).unet["in_channels"] for name in VARIANT_NAMES}
    assert sizes == {name: FAMILIES[name].unet_inputs.new_model_channels for name in VARIANT_NAMES}
