"""tools/add_input_channels.py: widening a model's U-Net input (inpainting channels, or N extra channels).

What it must do: the widened model computes exactly what the original did (new weights zero: the U-Net output is
compared bit for bit with the extra channels full of noise), every other tensor is the original's byte for byte,
the output is read back as the right family in every layout and from every layout, and a model that cannot be
widened that way is refused by name with nothing written.
"""

from __future__ import annotations

import pytest
import torch

from library import key_maps
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import EXTRA_CHANNELS, FAMILIES, INPAINTING, family_for
from library.input_channels import widened
from library.model_loading import instantiate_component
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import read_checkpoint
from tests.test_checkpoint_roundtrip import original_file_tensors
from tools.add_input_channels import main as add_channels

CONV_IN = key_maps.UNET_PREFIX + "input_blocks.0.0.weight"
WIDENED = [("sd1", "--add_inpainting_channels", "sd1-inpainting", 9), ("sd1", "--extra_channels 3", "sd1-extra", 7),
           ("sd2-512", "--add_inpainting_channels", "sd2-512-inpainting", 9),
           ("sd2-768-v", "--add_inpainting_channels", "sd2-768-v-inpainting", 9),
           ("sd2-768-v", "--extra_channels 2", "sd2-768-v-extra", 6),
           ("sdxl", "--add_inpainting_channels", "sdxl-inpainting", 9), ("sdxl", "--extra_channels 1", "sdxl-extra", 5)]


def run(capsys, flags: str, source, dest) -> tuple[int, str]:
    code = add_channels([*flags.split(), str(source), str(dest)])
    return code, capsys.readouterr().err


def unet_output(unet, sample: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The U-Net's prediction for `sample` at t=500 with random text conditioning (and SDXL's added conditioning)."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    context = torch.randn(sample.shape[0], 77, config.cross_attention_dim, generator=generator)
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(sample.shape[0], pooled, generator=generator),
                                       "time_ids": torch.rand(sample.shape[0], 6, generator=generator) * 1024}}
    with torch.no_grad():
        return unet(sample, 500, context, **added).sample


@pytest.mark.numbers  # (CI runs it again under other CPU kernels: the claim must not depend on this CPU's)
@pytest.mark.parametrize("family_name,flags,widened_name,width", WIDENED)
def test_widened_model_computes_exactly_what_the_original_did(family_name, flags, widened_name, width, tiny_files,
                                                             tmp_path, capsys):
    """Whatever the new channels hold (here noise, 3x the latents' scale), the U-Net output is the original's bit
    for bit: the new weights are zero, 0 x input adds exact zeros, and the CPU's fp32 kernels sum the original terms
    in the same order for the wider input (1 and 2 threads; CI again under other kernels). GPU kernels in half
    precision or channels-last may not: docs/benchmarks.md has the H200's measurements (one unit in the last place)."""
    out = tmp_path / "widened.safetensors"
    assert run(capsys, flags, tiny_files[family_name]["safetensors"], out)[0] == 0
    with read_checkpoint(tiny_files[family_name]["safetensors"]) as original, read_checkpoint(out) as wide:
        assert wide.family is FAMILIES[widened_name] and wide.configs.unet["in_channels"] == width
        before, after = instantiate_component(original, "unet"), instantiate_component(wide, "unet")
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    extra = torch.randn(2, width - 4, 8, 8, generator=generator) * 3
    for threads in (1, 2):  # (the kernels split their sums by thread: compare like with like)
        torch.set_num_threads(threads)
        try:
            expected = unet_output(before, latents)
            assert torch.equal(unet_output(after, torch.cat([latents, extra], dim=1)), expected), threads
            assert torch.equal(unet_output(after, torch.cat([latents, torch.zeros_like(extra)], dim=1)), expected)
        finally:
            torch.set_num_threads(1)


@pytest.mark.parametrize("family_name,flags,widened_name,width", WIDENED)
def test_only_the_first_convolution_changes(family_name, flags, widened_name, width, tiny_files, tmp_path, capsys):
    """Every tensor but conv_in is the original's byte for byte (the SD 2.x / SDXL text-encoder extras too); conv_in
    keeps its weights for the old channels and has zeros after them; the bias is unchanged."""
    out = tmp_path / "widened.safetensors"
    assert run(capsys, flags, tiny_files[family_name]["safetensors"], out)[0] == 0
    before, after = original_file_tensors(tiny_files[family_name]["safetensors"]), original_file_tensors(out)
    assert before.keys() == after.keys()
    for key in before:
        if key != CONV_IN:
            assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert after[CONV_IN].shape == (before[CONV_IN].shape[0], width, 3, 3)
    assert torch.equal(after[CONV_IN][:, :4], before[CONV_IN])
    assert torch.equal(after[CONV_IN][:, 4:], torch.zeros_like(after[CONV_IN][:, 4:]))
    assert not after[CONV_IN][:, 4:].signbit().any()  # +0, not -0


@pytest.mark.parametrize("source_fmt", ["diffusers_safetensors", "ckpt"])
@pytest.mark.parametrize("dest_suffix,fmt", [(".safetensors", "safetensors"), (".ckpt", "ckpt"), ("_dir", "diffusers")])
def test_any_layout_in_any_layout_out(source_fmt, dest_suffix, fmt, tiny_files, tmp_path, capsys):
    """From a diffusers folder or a .ckpt to each output layout; read back as the inpainting family, its folder a
    StableDiffusionXLInpaintPipeline with a 9-channel U-Net, its single file named by modelspec."""
    import json

    out = tmp_path / f"widened{dest_suffix}"
    assert run(capsys, "--add_inpainting_channels", tiny_files["sdxl"][source_fmt], out)[0] == 0
    with read_checkpoint(out) as checkpoint, read_checkpoint(tiny_files["sdxl"][source_fmt]) as original:
        assert checkpoint.family.name == "sdxl-inpainting"
        for component in ("vae", "text_encoder", "text_encoder_2"):
            for key, lazy in original.tensors[component].items():
                assert torch.equal(checkpoint.tensors[component][key].load(), lazy.load()), f"{component}.{key}"
    if fmt == "diffusers":
        index = json.loads((out / "model_index.json").read_text())
        unet = json.loads((out / "unet" / "config.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLInpaintPipeline" and unet["in_channels"] == 9
    if fmt == "safetensors":
        with SafetensorsReader(out) as reader:
            assert reader.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/inpaint"
            assert reader.metadata["modelspec.title"] == "widened"  # a new model, named after its file


def test_v_prediction_and_fp16_are_kept(tiny_files, tmp_path, capsys):
    """A 768-v .ckpt (the flag says v, as in kohya) becomes the 768-v inpainting family; --save_precision_as fp16
    stores zeros in fp16 too."""
    out = tmp_path / "v_inpainting.safetensors"
    code, _ = run(capsys, "--add_inpainting_channels --v_parameterization --save_precision_as fp16",
                  tiny_files["sd2-768-v"]["ckpt"], out)
    assert code == 0
    with read_checkpoint(out) as checkpoint:
        assert checkpoint.family.name == "sd2-768-v-inpainting" and checkpoint.prediction_type.value == "v_prediction"
        assert checkpoint.configs.unet["upcast_attention"] is True  # the 768-v model's own config
    tensors = original_file_tensors(out)
    assert tensors[CONV_IN].dtype == torch.float16 and not tensors[CONV_IN][:, 4:].any()


def test_extra_channels_grow_on_an_extra_channel_model(tiny_files, tmp_path, capsys):
    first, second = tmp_path / "two.safetensors", tmp_path / "four.safetensors"
    assert run(capsys, "--extra_channels 2", tiny_files["sd1"]["safetensors"], first)[0] == 0
    assert run(capsys, "--extra_channels 2", first, second)[0] == 0
    with read_checkpoint(second) as checkpoint:
        assert checkpoint.family.name == "sd1-extra" and checkpoint.configs.unet["in_channels"] == 8
    assert torch.equal(original_file_tensors(second)[CONV_IN][:, :6], original_file_tensors(first)[CONV_IN])


def test_the_ema_copy_of_conv_in_is_widened_alike(tiny_files, tmp_path):
    """A file that also holds the U-Net's EMA weights (`model_ema.*`, which WebUI may load) stays consistent."""
    tensors = original_file_tensors(tiny_files["sd1"]["safetensors"])
    ema = key_maps.ema_key(CONV_IN)
    tensors[ema] = tensors[CONV_IN] + 1
    tensors["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    save_tensors(tmp_path / "ema.safetensors", tensors)
    with read_checkpoint(tmp_path / "ema.safetensors") as checkpoint:
        save_checkpoint(widened(checkpoint, INPAINTING), tmp_path / "out.safetensors", SaveFormat.SAFETENSORS)
    out = original_file_tensors(tmp_path / "out.safetensors")
    assert out[ema].shape == (32, 9, 3, 3) and torch.equal(out[ema][:, :4], tensors[ema]) and not out[ema][:, 4:].any()
    assert torch.equal(out["model_ema.num_updates"], tensors["model_ema.num_updates"])


# ----------------------------------------------------------------------------------------------------------
# Refusals: named, and nothing written


@pytest.mark.parametrize("family_name,fmt", [("sd1-inpainting", "safetensors"), ("sdxl-inpainting", "diffusers")])
def test_an_inpainting_model_is_refused(family_name, fmt, variant_files, tmp_path, capsys):
    out = tmp_path / "twice.safetensors"
    code, err = run(capsys, "--add_inpainting_channels", variant_files[family_name][fmt], out)
    assert code == 2 and not out.exists()
    assert err.startswith("error:") and str(variant_files[family_name][fmt]) in err
    assert "already" in err and "inpainting" in err and "9 input channels" in err and "text-to-image" in err


@pytest.mark.parametrize("source,flags,needles", [
    ("sd1", "--extra_channels 5", ["--extra_channels 5", "9 input channels", "inpainting", "another number"]),
    ("sd2-512", "--extra_channels 1", ["--extra_channels 1", "5 input channels", "depth", "another number"]),
    ("sdxl-refiner", "--add_inpainting_channels", ["XL refiner", "no inpainting variant"]),
    ("sd2-512-depth", "--add_inpainting_channels", ["Stable Diffusion 2.x depth", "text-to-image model"]),
    ("sd1-inpainting", "--extra_channels 2", ["Stable Diffusion 1.x inpainting", "extra channels are added to"]),
])
def test_what_cannot_be_widened_so_is_refused(source, flags, needles, tiny_files, variant_files, tmp_path, capsys):
    files = tiny_files if source in tiny_files else variant_files
    out = tmp_path / "out.safetensors"
    code, err = run(capsys, flags, files[source]["safetensors"], out)
    assert code == 2 and not out.exists()
    assert err.startswith("error:") and all(needle in err for needle in needles), err


@pytest.mark.parametrize("flags", ["--extra_channels 0", "--extra_channels -2", "", "--add_inpainting_channels "
                                   "--extra_channels 2"])
def test_flags_are_checked_before_anything_is_read(flags, tiny_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        add_channels([*flags.split(), str(tiny_files["sd1"]["safetensors"]), str(tmp_path / "out.safetensors")])
    assert exited.value.code == 2 and not (tmp_path / "out.safetensors").exists()


def test_output_over_the_input_is_refused(tiny_files, tmp_path, capsys):
    import shutil

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_files["sd1"]["safetensors"], model)
    before = model.read_bytes()
    code, err = run(capsys, "--add_inpainting_channels", model, model)
    assert code == 2 and "error:" in err and model.read_bytes() == before


def test_library_function_keeps_the_family_rules(tiny_checkpoints):
    """`widened` is what the tool runs: families by data, prediction kept, no other tensor touched."""
    checkpoint = tiny_checkpoints["sd2-768-v"]
    wide = widened(checkpoint, EXTRA_CHANNELS, extra_channels=4)
    assert wide.family is family_for("sd2", checkpoint.prediction_type, EXTRA_CHANNELS)
    assert wide.configs.unet == dict(checkpoint.configs.unet, in_channels=8)
    assert all(wide.tensors[c] is checkpoint.tensors[c] for c in ("vae", "text_encoder"))
    assert all(wide.tensors["unet"][k] is v for k, v in checkpoint.tensors["unet"].items() if k != "conv_in.weight")
    with pytest.raises(ValueError, match="1 or more"):
        widened(checkpoint, EXTRA_CHANNELS, extra_channels=0)
