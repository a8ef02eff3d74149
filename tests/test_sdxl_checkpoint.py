"""SDXL base and refiner checkpoints: the key layout of Stability's single files, diffusers' own folders read back,
the text projection, and the tools that work on any family (convert, merge, --vae).

The family-parametrized round-trip, from_single_file / from_pretrained and model-output tests in
test_checkpoint_roundtrip.py and test_model_loading.py cover SDXL too; this file holds what is SDXL's own.
"""

from __future__ import annotations

import json

import pytest
import torch

from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import SDXL, SDXL_REFINER, ModelSize
from library.key_maps import key_table
from library.model_loading import replace_vae
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import read_checkpoint
from tests.test_checkpoint_roundtrip import assert_same_tensors, original_file_tensors

U = "model.diffusion_model."


def tables(family, size=ModelSize.FULL):
    configs = family.configs(size)
    slots = {slot.component: slot for slot in family.text_encoders}
    return {c: key_table(c, configs.of(c), slots.get(c)).by_diffusers() for c in family.components}


def test_sdxl_base_key_names_follow_the_stability_layout():
    """Names as in sd_xl_base_1.0.safetensors (what WebUI / ComfyUI read): 3 levels of input/output blocks with
    1 / 2 / 10 transformer layers, `label_emb` for the size/crop MLP, the two encoders under their embedders."""
    t = tables(SDXL)
    expected = [
        ("unet", "add_embedding.linear_1.weight", U + "label_emb.0.0.weight"),
        ("unet", "add_embedding.linear_2.bias", U + "label_emb.0.2.bias"),
        ("unet", "down_blocks.0.downsamplers.0.conv.weight", U + "input_blocks.3.0.op.weight"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
         U + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"),
        ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight",
         U + "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"),
        ("unet", "mid_block.attentions.0.transformer_blocks.9.norm3.bias",
         U + "middle_block.1.transformer_blocks.9.norm3.bias"),
        ("unet", "up_blocks.0.attentions.2.proj_out.weight", U + "output_blocks.2.1.proj_out.weight"),
        ("unet", "up_blocks.0.upsamplers.0.conv.weight", U + "output_blocks.2.2.conv.weight"),
        ("unet", "up_blocks.2.resnets.2.conv_shortcut.weight", U + "output_blocks.8.0.skip_connection.weight"),
        ("text_encoder", "encoder.layers.11.mlp.fc2.weight",
         "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
        ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc1.bias",
         "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.bias"),
        ("text_encoder_2", "text_model.embeddings.position_embedding.weight",
         "conditioner.embedders.1.model.positional_embedding"),
        ("text_encoder_2", "text_model.final_layer_norm.weight", "conditioner.embedders.1.model.ln_final.weight"),
    ]
    for component, name, original in expected:
        assert t[component][name].original == original, name
    fused = t["text_encoder_2"]["text_model.encoder.layers.31.self_attn.k_proj.weight"]
    assert fused.original == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    assert fused.original_shape == (3 * 1280, 1280)
    projection = t["text_encoder_2"]["text_projection.weight"]
    assert projection.original == "conditioner.embedders.1.model.text_projection" and projection.transposed
    assert "up_blocks.2.upsamplers.0.conv.weight" not in t["unet"]  # the last level has no upsampler
    # Every tensor of the file: these plus CLIP-L's position_ids buffer and bigG's logit_scale (kept as extras).
    assert [len({m.original for m in table.values()}) for table in t.values()] == [1680, 248, 196, 389]


def test_sdxl_refiner_key_names():
    """The refiner: 4 levels (plain blocks first and last), bigG alone as embedder 0."""
    t = tables(SDXL_REFINER)
    assert t["unet"]["up_blocks.0.upsamplers.0.conv.weight"].original == U + "output_blocks.2.1.conv.weight"
    assert t["unet"]["up_blocks.1.upsamplers.0.conv.weight"].original == U + "output_blocks.5.2.conv.weight"
    assert t["unet"]["down_blocks.3.resnets.1.conv1.weight"].original == U + "input_blocks.11.0.in_layers.2.weight"
    assert t["unet"]["down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q.weight"].original == \
        U + "input_blocks.8.1.transformer_blocks.3.attn1.to_q.weight"
    assert t["text_encoder_2"]["text_projection.weight"].original == "conditioner.embedders.0.model.text_projection"
    assert set(t) == {"unet", "vae", "text_encoder_2"}


def test_single_file_stores_the_projection_as_openclip_multiplies_by_it(tiny_files, tiny_checkpoints):
    """OpenCLIP computes pooled @ text_projection; diffusers' Linear stores the transpose. The pooled text
    embedding computed the OpenCLIP way from our file equals diffusers' `text_embeds` (same values, same order
    of operations up to the matmul's transposition, hence a float32 tolerance)."""
    from library.model_loading import instantiate_models

    tensors = original_file_tensors(tiny_files["sdxl"]["safetensors"])
    weight = tiny_checkpoints["sdxl"].tensors["text_encoder_2"]["text_projection.weight"].load()
    assert torch.equal(tensors["conditioner.embedders.1.model.text_projection"], weight.T)
    with read_checkpoint(tiny_files["sdxl"]["safetensors"]) as checkpoint:
        models = instantiate_models(checkpoint)
    ids = models.tokenizers[1]("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = models.text_encoders[1](ids, output_hidden_states=True)
        eos = int((ids[0] == 49407).nonzero()[0])
        pooled = models.text_encoders[1].text_model.final_layer_norm(out.hidden_states[-1])[0, eos]
        openclip_way = pooled @ tensors["conditioner.embedders.1.model.text_projection"]
    # float32 vector-matrix product vs Linear: the sums run in another order. Measured max difference 7e-7 on values
    # up to ~3 (3 prompts, AMD EPYC); the tolerance allows ~3e-5 there (40x margin). The untransposed matrix, the
    # defect this guards against, is off by ~3.
    torch.testing.assert_close(openclip_way, out.text_embeds[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled @ weight, out.text_embeds[0], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("family_name", ["sdxl", "sdxl-refiner"])
def test_a_folder_diffusers_saved_itself_reads_identically(family_name, tiny_files, tmp_path):
    """diffusers' own save_pretrained (transformers' key spelling, its configs) -> ours -> single file -> ours."""
    import diffusers

    family = SDXL if family_name == "sdxl" else SDXL_REFINER
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        str(tiny_files[family_name]["diffusers_safetensors"]), local_files_only=True)
    pipe.save_pretrained(tmp_path / "saved_by_diffusers")
    with read_checkpoint(tmp_path / "saved_by_diffusers") as theirs, \
            read_checkpoint(tiny_files[family_name]["diffusers_safetensors"]) as ours:
        assert theirs.family is family
        for component in family.components:
            assert theirs.tensors[component].keys() == ours.tensors[component].keys()
            for key, lazy in ours.tensors[component].items():
                assert torch.equal(theirs.tensors[component][key].load(), lazy.load()), f"{component}.{key}"
        single = save_checkpoint(theirs, tmp_path / "single.safetensors", SaveFormat.SAFETENSORS)
    converted, ours = original_file_tensors(single), original_file_tensors(tiny_files[family_name]["safetensors"])
    # A diffusers folder has no place for OpenCLIP's logit_scale (unused for generation); all else is the same.
    assert converted.keys() == {k for k in ours if not k.endswith("logit_scale")}
    assert all(torch.equal(converted[k], ours[k]) for k in converted)


def test_refiner_folder_is_an_img2img_pipeline_without_the_first_encoder(tiny_files):
    index = json.loads((tiny_files["sdxl-refiner"]["diffusers"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["requires_aesthetics_score"] is True
    base = json.loads((tiny_files["sdxl"]["diffusers"] / "model_index.json").read_text())
    assert base["_class_name"] == "StableDiffusionXLPipeline" and base["force_zeros_for_empty_prompt"] is True


def test_half_precision_single_file(tiny_checkpoints, tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        path = save_checkpoint(tiny_checkpoints["sdxl"], tmp_path / f"{dtype}.safetensors", SaveFormat.SAFETENSORS,
                               dtype=dtype)
        with read_checkpoint(path) as back:
            assert_same_tensors(back, _cast(tiny_checkpoints["sdxl"], dtype))
        with SafetensorsReader(path) as reader:
            assert reader.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
            assert reader.metadata["modelspec.resolution"] == "1024x1024"


def _cast(checkpoint, dtype):
    from dataclasses import replace

    from library.tensor_files import LazyTensor

    def cast(lazy):
        return LazyTensor(lazy.shape, dtype, lambda: lazy.load().to(dtype))
    return replace(checkpoint, tensors={c: {k: cast(v) for k, v in t.items()} for c, t in checkpoint.tensors.items()},
                   extras={k: cast(v) for k, v in checkpoint.extras.items()})


def test_convert_tool_both_ways_on_the_command_line(tiny_files, tmp_path):
    from tools.convert_diffusers20_original_sd import main as convert

    source = tiny_files["sdxl"]["safetensors"]
    assert convert([str(source), str(tmp_path / "folder"), "--use_safetensors"]) == 0
    assert convert([str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    before, after = original_file_tensors(source), original_file_tensors(tmp_path / "back.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_models_averages_two_sdxl_models(tiny_files, tiny_checkpoints, tmp_path):
    from library.tiny_models import tiny_checkpoint
    from tools.merge_models import main as merge

    other = save_checkpoint(tiny_checkpoint(SDXL, seed=11), tmp_path / "other.safetensors", SaveFormat.SAFETENSORS)
    out = tmp_path / "merged.safetensors"
    assert merge(["--models", str(tiny_files["sdxl"]["safetensors"]), str(other), "--ratios", "0.25", "0.75",
                  "--output", str(out)]) == 0
    a, b, merged = (original_file_tensors(p) for p in (tiny_files["sdxl"]["safetensors"], other, out))
    assert merged.keys() == a.keys()
    for key in ("conditioner.embedders.1.model.text_projection", U + "label_emb.0.0.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"):
        # float32 weighted sum in the same order as the tool: bit-equal
        assert torch.equal(merged[key], 0.25 * a[key] + 0.75 * b[key]), key


def test_separate_vae_file_replaces_the_sdxl_vae(tiny_files, tmp_path):
    """--vae with a VAE-only original file (as the fp16-fix SDXL VAE is shipped)."""
    from library.tiny_models import tiny_checkpoint

    donor = tiny_checkpoint(SDXL, seed=5)
    tensors = original_file_tensors(save_checkpoint(donor, tmp_path / "donor.safetensors", SaveFormat.SAFETENSORS))
    vae_only = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    save_tensors(tmp_path / "sdxl_vae.safetensors", vae_only)
    with read_checkpoint(tiny_files["sdxl"]["safetensors"]) as checkpoint:
        replace_vae(checkpoint, tmp_path / "sdxl_vae.safetensors")
        for key, lazy in donor.tensors["vae"].items():
            assert torch.equal(checkpoint.tensors["vae"][key].load(), lazy.load()), key
        assert torch.equal(checkpoint.tensors["unet"]["conv_in.weight"].load(),
                           original_file_tensors(tiny_files["sdxl"]["safetensors"])[U + "input_blocks.0.0.weight"])


@pytest.mark.parametrize("source_format, target", [("safetensors", SaveFormat.DIFFUSERS_SAFETENSORS),
                                                   ("diffusers_safetensors", SaveFormat.SAFETENSORS)])
def test_conversion_copies_renamed_tensors_without_loading_them(tiny_files, tmp_path, monkeypatch,
                                                                source_format, target):
    """Most tensors only change their name between layouts: their bytes are copied file to file. Only what the
    conversion computes is read into memory: OpenCLIP's fused q/k/v and its transposed text projection."""
    reads = []
    read = SafetensorsReader.read
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, name: reads.append(name) or read(self, name))
    with read_checkpoint(tiny_files["sdxl"][source_format]) as checkpoint:
        out = save_checkpoint(checkpoint, tmp_path / ("out" + ("" if target.is_diffusers else ".safetensors")),
                              target)
    computed = {name for name in reads if "in_proj" in name or "self_attn" in name or "text_projection" in name}
    assert reads and set(reads) == computed
    with read_checkpoint(out) as back, read_checkpoint(tiny_files["sdxl"][source_format]) as source:
        assert_same_tensors(back, source)
