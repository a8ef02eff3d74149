"""Loading a checkpoint into torch models, a separate VAE (--vae), and the command-line tools."""

from __future__ import annotations

import json

import pytest
import torch

from library import key_maps
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.model_loading import instantiate_models, replace_vae
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import read_checkpoint
from tests.conftest import FAMILY_NAMES
from tests.numerics import assert_outputs_close


@pytest.mark.numbers
@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_instantiated_models_match_diffusers_pipeline_outputs(family_name, tiny_files):
    """Our models from the single file compute what diffusers' own loader computes from our diffusers folder."""
    import diffusers

    with read_checkpoint(tiny_files[family_name]["safetensors"]) as checkpoint:
        models = instantiate_models(checkpoint)
    family = models.family
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        str(tiny_files[family_name]["diffusers_safetensors"]), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        contexts = []
        for slot, encoder, tokenizer in zip(family.text_encoders, models.text_encoders, models.tokenizers):
            def tokens(tok):
                return tok("a photo of a cat!", padding="max_length", max_length=77, return_tensors="pt").input_ids
            ids = tokens(tokenizer)
            assert torch.equal(ids, tokens(getattr(pipe, slot.tokenizer))), slot.tokenizer
            ours, theirs = encoder(ids), getattr(pipe, slot.component)(ids)
            assert_outputs_close(ours.last_hidden_state, theirs.last_hidden_state, what=f"{family_name} {slot.component}")
            if slot.kind.with_projection:
                assert_outputs_close(ours.text_embeds, theirs.text_embeds, what=f"{family_name} {slot.component} pooled")
            contexts.append(ours.last_hidden_state)
        context = torch.cat(contexts, dim=-1)  # SDXL: both encoders' states side by side
        added = {}
        if models.unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop (score) time ids
            pooled_width = ours.text_embeds.shape[-1]
            n_ids = (models.unet.config.projection_class_embeddings_input_dim - pooled_width) // \
                models.unet.config.addition_time_embed_dim
            added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled_width, generator=generator),
                                           "time_ids": torch.rand(1, n_ids, generator=generator) * 1024}}
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        assert_outputs_close(models.unet(latents, 500, context, **added).sample,
                             pipe.unet(latents, 500, context, **added).sample, what=f"{family_name} U-Net")
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        assert_outputs_close(models.vae.encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean,
                             what=f"{family_name} VAE")
    assert models.scheduler_config["prediction_type"] == checkpoint.prediction_type.value


def test_instantiate_in_half_precision(tiny_files):
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        models = instantiate_models(checkpoint, dtype=torch.float16, component_dtypes={"vae": torch.float32})
    assert next(models.unet.parameters()).dtype == torch.float16
    assert next(models.text_encoder.parameters()).dtype == torch.float16
    assert next(models.vae.parameters()).dtype == torch.float32
    assert not any(p.is_meta for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())


def _vae_tensors_from(path):
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys() if k.startswith(key_maps.VAE_PREFIX)}


@pytest.mark.parametrize("layout", ["bare_keys_with_loss", "prefixed", "full_checkpoint", "diffusers_vae_folder",
                                    "diffusers_pipeline"])
def test_separate_vae_replaces_the_models_vae(layout, tiny_files, tmp_path):
    donor = tiny_files["sd2-512"]  # same VAE architecture as SD 1.x, different weights
    vae = _vae_tensors_from(donor["safetensors"])
    if layout == "bare_keys_with_loss":
        bare = {k[len(key_maps.VAE_PREFIX):]: v for k, v in vae.items()}
        bare["loss.discriminator.main.0.weight"] = torch.zeros(2)
        path = tmp_path / "vae.safetensors"
        save_tensors(path, bare)
    elif layout == "prefixed":
        path = tmp_path / "vae.safetensors"
        save_tensors(path, vae)
    elif layout == "full_checkpoint":
        path = donor["safetensors"]
    elif layout == "diffusers_vae_folder":
        path = donor["diffusers_safetensors"] / "vae"
    else:
        path = donor["diffusers_safetensors"]
    with read_checkpoint(tiny_files["sd1"]["safetensors"]) as checkpoint:
        replace_vae(checkpoint, path)
        out = save_checkpoint(checkpoint, tmp_path / "baked.safetensors", SaveFormat.SAFETENSORS)
    baked = _vae_tensors_from(out)
    assert baked.keys() == vae.keys()
    assert all(torch.equal(baked[k], vae[k]) for k in vae)


# ----------------------------------------------------------------------------------------------------------
# Command-line tools (run in-process through their main() to avoid 5 s of imports per call)


def test_convert_tool_single_file_to_diffusers_fp16_and_back(tiny_files, tmp_path, capsys):
    from tools.compare_models import main as compare_main
    from tools.convert_diffusers20_original_sd import main as convert_main

    source = tiny_files["sd2-768-v"]["safetensors"]
    folder = tmp_path / "sd2v_fp16"
    assert convert_main([str(source), str(folder), "--fp16", "--use_safetensors", "--v2"]) == 0
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    with SafetensorsReader(folder / "unet" / "diffusion_pytorch_model.safetensors") as reader:
        assert {reader.info(k).dtype for k in reader.keys()} == {torch.float16}
    back = tmp_path / "back.ckpt"
    assert convert_main([str(folder), str(back), "--float", "--epoch", "7", "--global_step", "70"]) == 0
    data = torch.load(back, weights_only=True)
    assert (data["epoch"], data["global_step"]) == (7, 70)
    assert data["state_dict"][key_maps.UNET_PREFIX + "out.2.weight"].dtype == torch.float32
    capsys.readouterr()
    assert compare_main([str(source), str(back), "--allow_cast", "--v_parameterization"]) == 1  # fp16 rounding
    assert "differ" in capsys.readouterr().out
    assert compare_main([str(source), str(tiny_files["sd2-768-v"]["diffusers"])]) == 0


def test_compare_tool_tolerances_and_per_key_differences(tiny_checkpoints, tiny_files, tmp_path, capsys):
    """fp16 copy vs fp32 original: exact comparison fails and names each rounded tensor with its largest absolute
    difference; --atol above the fp16 rounding passes, below it fails."""
    from tools.compare_models import main as compare_main

    source = tiny_files["sd1"]["safetensors"]
    half = save_checkpoint(tiny_checkpoints["sd1"], tmp_path / "half.safetensors", SaveFormat.SAFETENSORS,
                           dtype=torch.float16)
    weight = tiny_checkpoints["sd1"].tensors["unet"]["conv_in.weight"].load()
    rounding = (weight.double() - weight.half().double()).abs().max().item()
    capsys.readouterr()
    assert compare_main([str(source), str(half), "--allow_cast"]) == 1
    out = capsys.readouterr().out
    assert f"DIFFERENT: unet.conv_in.weight: max abs difference {rounding:.3g} (" in out
    largest = max((t.load().double() - t.load().half().double()).abs().max().item()
                  for part in tiny_checkpoints["sd1"].tensors.values() for t in part.values())
    above = float(f"{2 * largest:.3g}")
    capsys.readouterr()
    assert compare_main([str(source), str(half), "--allow_cast", "--atol", str(above)]) == 0
    assert f"equal within --atol {above}" in capsys.readouterr().out
    assert compare_main([str(source), str(half), "--allow_cast", "--atol", f"{largest / 2:.3g}"]) == 1
    assert compare_main([str(source), str(half), "--allow_cast", "--atol", "-1"]) == 2


def test_convert_tool_rejects_conflicting_precisions(tiny_files, tmp_path):
    from tools.convert_diffusers20_original_sd import main as convert_main

    with pytest.raises(SystemExit, match="conflicting precisions"):
        convert_main([str(tiny_files["sd1"]["safetensors"]), str(tmp_path / "x.safetensors"), "--fp16", "--bf16"])
    assert not (tmp_path / "x.safetensors").exists()


def test_show_metadata_prints_sorted_json(tiny_files, capsys):
    from tools.show_metadata import main as show_main

    assert show_main(["--model", str(tiny_files["sd1"]["safetensors"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["modelspec.architecture"] == "stable-diffusion-v1"
    assert list(shown) == sorted(shown)


def test_make_tiny_model_tool(tmp_path):
    from tools.make_tiny_model import main as make_main

    assert make_main(["--family", "sd2-512", str(tmp_path / "m.ckpt")]) == 0
    with read_checkpoint(tmp_path / "m.ckpt") as checkpoint:
        assert checkpoint.family.name == "sd2-512"
