"""Checkpoint layer: key tables, bit-exact round trips between every format pair, and diffusers as an
independent reader of what we write."""

from __future__ import annotations

import pytest
import torch

from library import key_maps
from library.checkpoint_writer import SaveFormat, save_checkpoint, write_config_folder
from library.families import FAMILIES, SD1, SD2_512, ModelSize, PredictionType
from library.key_maps import key_table
from library.safetensors_io import SafetensorsReader, save_tensors
from library.sd_checkpoint import EXTRAS_FILE, FamilyHints, read_checkpoint, with_linear_projection
from tests.conftest import FAMILY_NAMES

FORMATS = {"safetensors": SaveFormat.SAFETENSORS, "ckpt": SaveFormat.CKPT, "diffusers": SaveFormat.DIFFUSERS,
           "diffusers_safetensors": SaveFormat.DIFFUSERS_SAFETENSORS}
SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "_dir", "diffusers_safetensors": "_stdir"}


def hints_for(family_name: str, fmt: str) -> FamilyHints:
    # A .ckpt has no metadata, so a v-prediction model needs the flag (as in kohya).
    return FamilyHints(v_parameterization=FAMILIES[family_name].prediction_type is PredictionType.V_PREDICTION
                       and fmt == "ckpt")


def assert_same_tensors(a, b):
    """Two SDCheckpoints hold the same components, keys and bit-identical tensors (and extras)."""
    for component in a.tensors:
        assert a.tensors[component].keys() == b.tensors[component].keys(), component
        for key, lazy in a.tensors[component].items():
            x, y = lazy.load(), b.tensors[component][key].load()
            assert x.dtype == y.dtype and torch.equal(x, y), f"{component}.{key}"
    assert a.extras.keys() == b.extras.keys()
    for key in a.extras:
        assert torch.equal(a.extras[key].load(), b.extras[key].load()), key


def original_file_tensors(path):
    """All tensors of an original-layout file, read independently of the conversion code."""
    if str(path).endswith(".safetensors"):
        with SafetensorsReader(path) as reader:
            return {k: reader.read(k) for k in reader.keys()}
    return torch.load(path, weights_only=True)["state_dict"]


# ----------------------------------------------------------------------------------------------------------
# Key tables


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
@pytest.mark.parametrize("size", list(ModelSize))
def test_key_tables_are_complete_and_one_to_one(family_name, size):
    family = FAMILIES[family_name]
    configs = family.configs(size)
    slots = {slot.component: slot for slot in family.text_encoders}
    for component in family.components:
        table = key_table(component, configs.of(component), slots.get(component))
        originals = [m.original for m in table.mappings]
        diffusers = [name for m in table.mappings for name in m.diffusers]
        assert len(set(originals)) == len(originals)
        assert len(set(diffusers)) == len(diffusers)


def test_sd15_key_count_matches_the_published_checkpoint():
    # The widely used v1-5-pruned-emaonly.safetensors holds 1,131 tensors: 686 UNet + 248 VAE + 196 CLIP
    # + the CLIP position_ids buffer.
    configs = SD1.configs()
    (slot,) = SD1.text_encoders
    counts = [len(key_table(c, configs.of(c), slot).mappings) for c in ("unet", "vae", "text_encoder")]
    assert counts == [686, 248, 196]
    assert sum(counts) + len(key_maps.text_encoder_extra_keys(slot, 12)) == 1131  # the position_ids buffer


def test_key_table_names_follow_the_ldm_layout():
    configs = SD2_512.configs()
    unet = key_table("unet", configs.unet).by_diffusers()
    vae = key_table("vae", configs.vae).by_diffusers()
    (slot,) = SD2_512.text_encoders
    te = key_table("text_encoder", configs.of("text_encoder"), slot).by_diffusers()
    P, V, O = key_maps.UNET_PREFIX, key_maps.VAE_PREFIX, "cond_stage_model.model."
    expected = [
        (unet, "down_blocks.1.resnets.0.conv_shortcut.weight", P + "input_blocks.4.0.skip_connection.weight"),
        (unet, "down_blocks.2.downsamplers.0.conv.weight", P + "input_blocks.9.0.op.weight"),
        (unet, "up_blocks.0.upsamplers.0.conv.weight", P + "output_blocks.2.1.conv.weight"),
        (unet, "up_blocks.1.upsamplers.0.conv.weight", P + "output_blocks.5.2.conv.weight"),
        (unet, "up_blocks.3.attentions.2.proj_out.weight", P + "output_blocks.11.1.proj_out.weight"),
        (unet, "mid_block.resnets.1.time_emb_proj.bias", P + "middle_block.2.emb_layers.1.bias"),
        (unet, "time_embedding.linear_2.weight", P + "time_embed.2.weight"),
        (vae, "decoder.up_blocks.0.resnets.2.conv2.weight", V + "decoder.up.3.block.2.conv2.weight"),
        (vae, "encoder.mid_block.attentions.0.to_out.0.weight", V + "encoder.mid.attn_1.proj_out.weight"),
        (vae, "decoder.up_blocks.3.resnets.0.conv_shortcut.bias", V + "decoder.up.0.block.0.nin_shortcut.bias"),
        (te, "encoder.layers.5.self_attn.k_proj.weight", O + "transformer.resblocks.5.attn.in_proj_weight"),
        (te, "embeddings.position_embedding.weight", O + "positional_embedding"),
        (te, "final_layer_norm.bias", O + "ln_final.bias"),
    ]
    for table, name, original in expected:
        assert table[name].original == original, name
    fused = te["encoder.layers.0.self_attn.q_proj.weight"]
    assert fused.diffusers == tuple(f"encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    assert fused.original_shape == (3 * 1024, 1024)
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].original_shape == (512, 512, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
@pytest.mark.parametrize("first,second", [("safetensors", "diffusers_safetensors"), ("safetensors", "diffusers"),
                                          ("ckpt", "diffusers_safetensors"), ("safetensors", "ckpt")])
def test_original_round_trip_is_bit_exact(family_name, first, second, tiny_files, tmp_path):
    """original -> other format -> original: same key set, identical tensors, read independently."""
    assert_original_round_trip(tiny_files[family_name][first], family_name, first, second, tmp_path)


def assert_original_round_trip(source, family_name: str, first: str, second: str, tmp_path, *,
                               check_family: bool = False) -> None:
    """`source` (an original file in format `first`) -> format `second` -> `first` again: the file read back
    independently has the same keys and identical tensors (`check_family`: and the middle is read as the family)."""
    with read_checkpoint(source, hints_for(family_name, first)) as checkpoint:
        middle = save_checkpoint(checkpoint, tmp_path / f"mid{SUFFIX[second]}", FORMATS[second])
    with read_checkpoint(middle, hints_for(family_name, second)) as checkpoint:
        assert not check_family or checkpoint.family.name == family_name
        back = save_checkpoint(checkpoint, tmp_path / f"back{SUFFIX[first]}", FORMATS[first])
    before, after = original_file_tensors(source), original_file_tensors(back)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
@pytest.mark.parametrize("middle_fmt", ["safetensors", "ckpt"])
def test_diffusers_round_trip_is_bit_exact(family_name, middle_fmt, tiny_files, tmp_path):
    """diffusers -> original -> diffusers: same components, keys and tensors."""
    source = tiny_files[family_name]["diffusers_safetensors"]
    with read_checkpoint(source) as checkpoint:
        middle = save_checkpoint(checkpoint, tmp_path / f"mid{SUFFIX[middle_fmt]}", FORMATS[middle_fmt])
    with read_checkpoint(middle, hints_for(family_name, middle_fmt)) as checkpoint:
        back = save_checkpoint(checkpoint, tmp_path / "back", SaveFormat.DIFFUSERS_SAFETENSORS)
    with read_checkpoint(source) as a, read_checkpoint(back) as b:
        assert a.family is b.family and a.configs == b.configs
        assert_same_tensors(a, b)


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_every_format_reads_back_as_the_model_written(family_name, tiny_checkpoints, tiny_files):
    for fmt, path in tiny_files[family_name].items():
        with read_checkpoint(path, hints_for(family_name, fmt)) as checkpoint:
            assert checkpoint.family.name == family_name
            assert_same_tensors(tiny_checkpoints[family_name], checkpoint)


def test_save_precision_casts_weights_and_keeps_schedule_buffers(tiny_files, tmp_path):
    source = tiny_files["sd1"]["safetensors"]
    tensors = original_file_tensors(source)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    tensors["betas"] = betas.float()
    save_tensors(tmp_path / "with_buffers.safetensors", tensors)
    with read_checkpoint(tmp_path / "with_buffers.safetensors") as checkpoint:
        out = save_checkpoint(checkpoint, tmp_path / "half_dir", SaveFormat.DIFFUSERS_SAFETENSORS, dtype=torch.float16)
    with read_checkpoint(out) as checkpoint:
        back = save_checkpoint(checkpoint, tmp_path / "half.safetensors", SaveFormat.SAFETENSORS)
    half = original_file_tensors(back)
    assert half.keys() == tensors.keys()
    for key, value in tensors.items():
        if key == "betas":
            assert half[key].dtype == torch.float32 and torch.equal(half[key], value)
        else:
            assert half[key].dtype == torch.float16 and torch.equal(half[key], value.half()), key


# ----------------------------------------------------------------------------------------------------------
# Diffusers as an independent reader


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_diffusers_from_single_file_reads_our_file(family_name, fmt, tiny_files, tmp_path):
    family = FAMILIES[family_name]
    with read_checkpoint(tiny_files[family_name]["diffusers_safetensors"]) as source:
        config_dir = tmp_path / "config"
        write_config_folder(source, config_dir)
        pipe = pipeline_class(family).from_single_file(str(tiny_files[family_name][fmt]), config=str(config_dir),
                                                       local_files_only=True)
        for component in family.components:
            loaded = getattr(pipe, component).state_dict()
            loaded.pop("embeddings.position_ids", None)
            expected = source.tensors[component]
            assert loaded.keys() == expected.keys(), component
            for key, lazy in expected.items():
                assert torch.equal(loaded[key], lazy.load()), f"{component}.{key}"
    assert pipe.scheduler.config.prediction_type == FAMILIES[family_name].prediction_type.value


def pipeline_class(family):
    """diffusers' pipeline class of a family (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def test_diffusers_reads_sd2_file_written_without_original_extras(tmp_path):
    """A diffusers SD 2.x model has no last OpenCLIP layer or text_projection; the single file we write from it
    lacks them too (WebUI and ComfyUI use the penultimate layer) and still loads in diffusers."""
    from diffusers import StableDiffusionPipeline

    from library.tiny_models import tiny_checkpoint

    checkpoint = tiny_checkpoint(SD2_512, with_original_extras=False)
    path = save_checkpoint(checkpoint, tmp_path / "sd2.safetensors", SaveFormat.SAFETENSORS)
    keys = set(original_file_tensors(path))
    assert "cond_stage_model.model.text_projection" not in keys
    assert not any(".resblocks.2." in k for k in keys)  # the tiny diffusers encoder has layers 0 and 1
    write_config_folder(checkpoint, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    ours = checkpoint.tensors["text_encoder"]
    for key, value in pipe.text_encoder.state_dict().items():
        if key != "embeddings.position_ids":
            assert torch.equal(value, ours[key].load()), key


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_diffusers_from_pretrained_reads_our_folder(family_name, tiny_checkpoints, tiny_files):
    family = FAMILIES[family_name]
    folder = tiny_files[family_name]["diffusers_safetensors"]
    pipe = pipeline_class(family).from_pretrained(str(folder), local_files_only=True)
    expected = tiny_checkpoints[family_name]
    for component in family.components:
        loaded = getattr(pipe, component).state_dict()
        loaded.pop("embeddings.position_ids", None)
        assert loaded.keys() == expected.tensors[component].keys()
        for key, lazy in expected.tensors[component].items():
            assert torch.equal(loaded[key], lazy.load()), f"{component}.{key}"
    assert pipe.scheduler.config.prediction_type == family.prediction_type.value
    for slot in family.text_encoders:  # OpenCLIP-trained encoders pad with "!" (id 0), CLIP ViT-L with EOS
        assert getattr(pipe, slot.tokenizer).pad_token_id == (0 if slot.kind.openclip_layout else 49407)


def test_diffusers_text_encoder_keys_carry_the_text_model_prefix(tiny_files):
    # transformers 4.x silently loads random text-encoder weights unless keys start with "text_model.".
    for fmt in ("diffusers_safetensors", "diffusers"):
        folder = tiny_files["sd1"][fmt]
        if fmt == "diffusers_safetensors":
            with SafetensorsReader(folder / "text_encoder" / "model.safetensors") as reader:
                keys = reader.keys()
        else:
            keys = list(torch.load(folder / "text_encoder" / "pytorch_model.bin", weights_only=True))
        assert keys and all(k.startswith("text_model.") for k in keys)


def test_sd2_original_extras_live_beside_the_diffusers_models(tiny_files):
    folder = tiny_files["sd2-512"]["diffusers_safetensors"]
    with SafetensorsReader(folder / EXTRAS_FILE) as reader:
        names = set(reader.keys())
    assert names == set(key_maps.text_encoder_extra_keys(SD2_512.text_encoders[0], 2))
    assert not (tiny_files["sd1"]["diffusers_safetensors"] / EXTRAS_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# Layout variants found in the wild


def test_ema_weights_are_recognised_and_extractable(tiny_files, tmp_path):
    tensors = original_file_tensors(tiny_files["sd1"]["safetensors"])
    unet_keys = [k for k in tensors if k.startswith(key_maps.UNET_PREFIX)]
    for key in unet_keys:
        tensors[key_maps.ema_key(key)] = tensors[key] + 1
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    path = tmp_path / "ema.safetensors"
    save_tensors(path, tensors)
    with read_checkpoint(path) as regular, read_checkpoint(path, extract_ema=True) as ema:
        name = "conv_in.weight"
        original = tensors[key_maps.UNET_PREFIX + "input_blocks.0.0.weight"]
        assert torch.equal(regular.tensors["unet"][name].load(), original)
        assert torch.equal(ema.tensors["unet"][name].load(), original + 1)
        # Without --extract_ema the EMA tensors are carried over into an original-layout copy.
        copy = save_checkpoint(regular, tmp_path / "copy.safetensors", SaveFormat.SAFETENSORS)
        assert set(original_file_tensors(copy)) == set(tensors)
        # With it, the EMA weights become the model and no EMA copy remains.
        baked = save_checkpoint(ema, tmp_path / "baked.safetensors", SaveFormat.SAFETENSORS)
        baked_tensors = original_file_tensors(baked)
        assert not any(k.startswith("model_ema.") for k in baked_tensors)
        assert torch.equal(baked_tensors[key_maps.UNET_PREFIX + "input_blocks.0.0.weight"], original + 1)


def test_old_clip_layout_and_position_ids_are_accepted(tiny_files, tmp_path):
    tensors = original_file_tensors(tiny_files["sd1"]["safetensors"])
    old = {}
    for key, value in tensors.items():
        old[key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = value
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    save_tensors(tmp_path / "old.safetensors", old)
    with read_checkpoint(tmp_path / "old.safetensors") as checkpoint:
        assert checkpoint.family is SD1
        out = save_checkpoint(checkpoint, tmp_path / "new.safetensors", SaveFormat.SAFETENSORS)
    new = original_file_tensors(out)
    assert set(new) == set(tensors) | {"cond_stage_model.transformer.text_model.embeddings.position_ids"}


def test_linear_projection_option_reshapes_conv_projections(tiny_files, tmp_path):
    tensors = original_file_tensors(tiny_files["sd2-512"]["safetensors"])
    conv = {k: (v[..., None, None] if (".proj_in.weight" in k or ".proj_out.weight" in k) and v.ndim == 2 else v)
            for k, v in tensors.items()}
    save_tensors(tmp_path / "conv.safetensors", conv)
    with read_checkpoint(tmp_path / "conv.safetensors") as checkpoint:
        assert checkpoint.configs.unet["use_linear_projection"] is False
        linear = with_linear_projection(checkpoint)
        assert linear.configs.unet["use_linear_projection"] is True
        out = save_checkpoint(linear, tmp_path / "linear_dir", SaveFormat.DIFFUSERS_SAFETENSORS)
    with read_checkpoint(out) as checkpoint:
        weight = checkpoint.tensors["unet"]["down_blocks.0.attentions.0.proj_in.weight"].load()
        assert weight.ndim == 2
        assert torch.equal(weight, tensors[key_maps.UNET_PREFIX + "input_blocks.1.1.proj_in.weight"])


# ----------------------------------------------------------------------------------------------------------
# Family detection


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_family_is_detected_from_the_weights(family_name, tiny_files):
    for fmt in ("safetensors", "diffusers"):
        with read_checkpoint(tiny_files[family_name][fmt]) as checkpoint:
            assert checkpoint.family.name == family_name
    with read_checkpoint(tiny_files[family_name]["ckpt"]) as checkpoint:
        # A .ckpt cannot say it predicts v: without the flag it is read as the epsilon family of its architecture.
        assert checkpoint.family.arch == FAMILIES[family_name].arch
        assert checkpoint.prediction_type is PredictionType.EPSILON


def test_v_prediction_from_yaml_beside_the_file(tiny_files, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(tiny_files["sd2-768-v"]["ckpt"].read_bytes())
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    with read_checkpoint(path) as checkpoint:
        assert checkpoint.family.name == "sd2-768-v"


def test_v_parameterization_flag_on_sd1_keeps_the_sd1_family(tiny_files, tmp_path):
    with read_checkpoint(tiny_files["sd1"]["ckpt"], FamilyHints(v_parameterization=True)) as checkpoint:
        assert checkpoint.family is SD1
        assert checkpoint.prediction_type is PredictionType.V_PREDICTION
        out = save_checkpoint(checkpoint, tmp_path / "v1v.safetensors", SaveFormat.SAFETENSORS)
    with SafetensorsReader(out) as reader:
        assert reader.metadata["modelspec.prediction_type"] == "v"
        assert reader.metadata["modelspec.architecture"] == "stable-diffusion-v1"
    with read_checkpoint(out) as checkpoint:  # the file now says it predicts v
        assert checkpoint.prediction_type is PredictionType.V_PREDICTION


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_safetensors_carry_modelspec_metadata(family_name, tiny_files):
    family = FAMILIES[family_name]
    with SafetensorsReader(tiny_files[family_name]["safetensors"]) as reader:
        meta = reader.metadata
    assert meta["modelspec.architecture"] == family.modelspec_architecture
    assert meta["modelspec.prediction_type"] == family.prediction_type.modelspec_name
    assert meta["modelspec.resolution"] == f"{family.default_resolution}x{family.default_resolution}"
    assert meta["modelspec.title"] == family_name
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.date"][:4].isdigit()


def test_ckpt_holds_epoch_and_global_step(tiny_checkpoints, tmp_path):
    path = save_checkpoint(tiny_checkpoints["sd1"], tmp_path / "m.ckpt", SaveFormat.CKPT, epoch=3, global_step=1200)
    data = torch.load(path, weights_only=True)
    assert data["epoch"] == 3 and data["global_step"] == 1200 and "state_dict" in data
    with read_checkpoint(path) as checkpoint:
        assert checkpoint.values == {"epoch": 3, "global_step": 1200}
