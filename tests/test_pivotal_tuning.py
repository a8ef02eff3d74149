"""Pivotal tuning: a new token trained with a LoRA (train_network.py, sdxl_train_network.py) or a full model
(train_db.py, sdxl_train.py), saved with the model (SDXL: vectors in both text encoders, clip_l / clip_g); and frozen
embeddings loaded into training (--textual_inversion_embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader

from tests.numerics import check_golden_losses, golden_case_args
from tests.recipe_helpers import logged_losses, run_script as run, tiny_workspace



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("pivotal"), images=4, folder="2_zwxq shape", prefix="zwxq shape, ")


PIVOTAL_COVERS = ["--pivotal_init_word", "shape"]  # what the golden case "lora_pivotal" is there for (tests/golden/README.md)
PIVOT = ["--pivotal_token", "zwxq", "--pivotal_num_vectors", "2", "--pivotal_init_word", "shape"]


def common(root: Path, out: str, pivot: bool = True) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "model", "--resolution", "64", "--seed", "4",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--logging_dir", str(root / out / "logs")] + (PIVOT if pivot else [])


def lora_args(root: Path, out: str, pivot: bool = True) -> list[str]:
    return common(root, out, pivot) + ["--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3"]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


@pytest.mark.numbers
def test_lora_with_pivotal_token_golden_resume_and_files(workspace):
    from library.textual_inversion import load_embedding

    root = workspace
    extra = ["--max_train_steps", "4", "--pivotal_steps", "2", "--save_every_n_steps", "2", "--save_state"]
    run("train_network", lora_args(root, "lora_full", pivot=False) + golden_case_args("lora_pivotal", PIVOT + extra,
                                                                                      {"lora_pivotal": PIVOTAL_COVERS}))
    losses = logged_losses(root / "lora_full" / "logs")
    check_golden_losses("pivotal_losses.json", "lora_pivotal", losses)

    # The word trains for 2 steps, then stays: the step-2 and final embeddings are equal, and differ from the start.
    at2 = load_embedding(root / "lora_full" / "model-step00000002_embeddings" / "zwxq.safetensors", dim=32)
    final = load_embedding(root / "lora_full" / "model_embeddings" / "zwxq.safetensors", dim=32)
    assert torch.equal(at2, final) and at2.shape == (2, 32)
    # The LoRA itself keeps training after the word is frozen.
    a, b = tensors(root / "lora_full" / "model-step00000002.safetensors"), tensors(root / "lora_full" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("bundle_emb") for k in b)  # beside the LoRA by default

    run("train_network", lora_args(root, "lora_part") + extra, stop_after=1)
    run("train_network", lora_args(root, "lora_part") + extra, stop_after=1)  # a fresh start, killed again
    run("train_network", lora_args(root, "lora_part") + extra + ["--resume", str(root / "lora_full" / "model-step00000002-state")])
    c = tensors(root / "lora_part" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert torch.equal(final, load_embedding(root / "lora_part" / "model_embeddings" / "zwxq.safetensors", dim=32))


def test_pivotal_files_load_in_diffusers(workspace):
    """The LoRA loads with load_lora_weights and the word with load_textual_inversion; with --bundle_embeddings the
    word is inside the LoRA under WebUI's / ComfyUI's bundle key, and our loader skips it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from library.textual_inversion import load_embedding

    root = workspace
    run("train_network", lora_args(root, "lora_files") + ["--max_train_steps", "2"])
    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(root / "lora_files"), weight_name="model.safetensors")
    pipe.load_textual_inversion(str(root / "lora_files" / "model_embeddings" / "zwxq.safetensors"), token="zwxq")
    assert pipe.maybe_convert_prompt("a zwxq", pipe.tokenizer) == "a zwxq zwxq_1"

    run("train_network", lora_args(root, "lora_bundle") + ["--max_train_steps", "2", "--bundle_embeddings"])
    bundled = tensors(root / "lora_bundle" / "model.safetensors")
    # AUTOMATIC1111's one-encoder bundle key (library/textual_inversion.bundle_tensors says where it is read).
    assert torch.equal(bundled["bundle_emb.zwxq.string_to_param.*"],
                       load_embedding(root / "lora_files" / "model_embeddings" / "zwxq.safetensors", dim=32))
    assert not (root / "lora_bundle" / "model_embeddings").exists()
    # Our trainer takes the bundled file as --network_weights (the bundle is not a network weight).
    run("train_network", lora_args(root, "lora_continue") + ["--max_train_steps", "1", "--network_weights",
                                                             str(root / "lora_bundle" / "model.safetensors")])


def test_full_model_with_pivotal_token(workspace):
    """train_db: the checkpoint keeps the standard vocabulary (WebUI layout, same keys as the base); the word is
    saved beside it."""
    from library.textual_inversion import load_embedding

    root = workspace
    run("train_db", common(root, "db") + ["--learning_rate", "1e-4", "--max_train_steps", "2"])
    base, out = tensors(root / "sd1.safetensors"), tensors(root / "db" / "model.safetensors")
    assert out.keys() == base.keys()
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert out[key].shape == base[key].shape and not torch.equal(out[key], base[key])  # the TE trained too
    vectors = load_embedding(root / "db" / "model_embeddings" / "zwxq.safetensors", dim=32)
    assert vectors.shape == (2, 32)


def test_frozen_embeddings_are_used_not_trained(workspace, tmp_path):
    from library.textual_inversion import save_embedding

    root = workspace
    path = save_embedding(tmp_path / "zwxq.pt", torch.randn(2, 32), token_string="zwxq", step=0)
    before = path.read_bytes()
    run("train_network", lora_args(root, "frozen", pivot=False) + ["--max_train_steps", "2",
                                                                   "--textual_inversion_embeddings", str(path)])
    run("train_network", lora_args(root, "plain", pivot=False) + ["--max_train_steps", "2"])
    with_emb, plain = tensors(root / "frozen" / "model.safetensors"), tensors(root / "plain" / "model.safetensors")
    assert any(not torch.equal(with_emb[k], plain[k]) for k in plain)  # the word changed the conditioning
    assert path.read_bytes() == before and not (root / "frozen" / "model_embeddings").exists()


@pytest.mark.parametrize("script", ["train_network", "train_db"])
def test_pivotal_token_in_no_caption_is_an_error(workspace, script):
    """The captions say "zwxq shape": a --pivotal_token in none of them would train nothing. --caption_prefix
    counts as part of every caption."""
    make_args = lora_args if script == "train_network" else common
    argv = make_args(workspace, f"absent_{script}") + ["--max_train_steps", "1"]
    argv[argv.index("zwxq")] = "qxvz"
    with pytest.raises(SystemExit) as info:
        run(script, argv)
    assert "--pivotal_token 'qxvz': no caption contains it" in str(info.value.code)
    run(script, argv + ["--caption_prefix", "qxvz"])
    assert (workspace / f"absent_{script}" / "model_embeddings" / "qxvz.safetensors").exists()


def test_pivotal_errors_name_the_pivotal_flags(workspace):
    """The word's checks are textual inversion's (shared add_word); their messages name the flags this trainer has."""
    argv = lora_args(workspace, "bad_init") + ["--max_train_steps", "1"]
    argv[argv.index("shape", argv.index("--pivotal_init_word"))] = "a big shape"  # 3 tokens for 2 vectors
    with pytest.raises(SystemExit) as info:
        run("train_network", argv)
    assert "--pivotal_init_word 'a big shape' is 3 tokens, more than --pivotal_num_vectors 2" in str(info.value.code)


# ----------------------------------------------------------------------------------------------------------
# SDXL: the word has vectors in both text encoders (clip_l: CLIP ViT-L, 32 wide in the tiny model; clip_g: OpenCLIP
# bigG, 48 wide), trained together, saved and bundled in the SDXL embedding layout.

SDXL_WIDTHS = {"clip_l": 32, "clip_g": 48}


@pytest.fixture(scope="module")
def sdxl_workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("pivotal_sdxl"), images=4, folder="2_zwxq shape",
                          prefix="zwxq shape, ", models={"sdxl": "sdxl.safetensors"})


def sdxl_common(root: Path, out: str, pivot: bool = True) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sdxl.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "model", "--resolution", "64", "--seed", "7",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--logging_dir", str(root / out / "logs")] + (PIVOT if pivot else [])


def sdxl_lora_args(root: Path, out: str, pivot: bool = True) -> list[str]:
    return sdxl_common(root, out, pivot) + ["--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3"]


def start_vectors(root: Path) -> dict[str, torch.Tensor]:
    """What --pivotal_init_word shape --pivotal_num_vectors 2 starts each encoder's vectors from."""
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from library.textual_inversion import init_vectors

    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    return {slot.embedding_key: init_vectors(tokenizer, encoder.get_input_embeddings(), "shape", 2)
            for slot, tokenizer, encoder in zip(models.family.text_encoders, models.tokenizers, models.text_encoders)}


# What the golden case is there for (tests/golden/README.md). Removing it moves the first step's loss (the word's
# starting vectors enter the first forward pass; later steps have the loose tolerance), by how much depends on the
# timesteps that step draws: 8.9x / 25x / 39.5x the tolerance with --seed 5 / 4 / 7; the case uses 7.
SDXL_PIVOTAL_COVERS = {"sdxl_lora_pivotal": ["--pivotal_init_word", "shape"]}


@pytest.mark.numbers
def test_sdxl_lora_with_pivotal_token_golden_and_exact_resume(sdxl_workspace):
    """sdxl_train_network.py: golden losses; the word trains in both encoders until --pivotal_steps 3, then stays
    while the LoRA trains on; a run stopped after step 3 and resumed from its step-2 state (the word still training
    there, so both encoders' vectors and their optimizer state must come back exactly) ends with the LoRA and the
    embedding file of the uninterrupted run, tensor for tensor."""
    from library.textual_inversion import load_encoder_embeddings

    root = sdxl_workspace
    extra = ["--max_train_steps", "5", "--pivotal_steps", "3", "--save_every_n_steps", "2", "--save_state"]
    run("sdxl_train_network", sdxl_lora_args(root, "xl_full", pivot=False)
               + golden_case_args("sdxl_lora_pivotal", PIVOT + extra, SDXL_PIVOTAL_COVERS))
    check_golden_losses("pivotal_losses.json", "sdxl_lora_pivotal", logged_losses(root / "xl_full" / "logs"))

    encoders = list(SDXL_WIDTHS.items())

    def embedding(out: str, stem: str = "model") -> dict[str, torch.Tensor]:
        path = root / out / f"{stem}_embeddings" / "zwxq.safetensors"
        assert tensors(path).keys() == SDXL_WIDTHS.keys()  # clip_l and clip_g, nothing else
        return dict(zip(SDXL_WIDTHS, load_encoder_embeddings(path, encoders, "SDXL")))

    start, at2, at4, final = (start_vectors(root), embedding("xl_full", "model-step00000002"),
                              embedding("xl_full", "model-step00000004"), embedding("xl_full"))
    for key, width in SDXL_WIDTHS.items():
        assert final[key].shape == (2, width)
        assert not torch.equal(at2[key], start[key]), f"{key}: untrained after 2 steps"
        assert not torch.equal(at4[key], at2[key]), f"{key}: untrained in step 3 (--pivotal_steps 3)"
        assert torch.equal(at4[key], final[key]), f"{key}: trained after --pivotal_steps"
    lora4 = tensors(root / "xl_full" / "model-step00000004.safetensors")
    lora = tensors(root / "xl_full" / "model.safetensors")
    assert any(not torch.equal(lora4[k], lora[k]) for k in lora)  # the LoRA trains on
    assert not any(k.startswith("bundle_emb") for k in lora)
    state = torch.load(root / "xl_full" / "model-step00000002-state" / "trainable.pt", weights_only=True)
    assert torch.equal(state["pivotal_embedding"], at2["clip_l"]) and torch.equal(state["pivotal_embedding_2"],
                                                                                  at2["clip_g"])

    run("sdxl_train_network", sdxl_lora_args(root, "xl_part") + extra, stop_after=3)
    assert not (root / "xl_part" / "model.safetensors").exists()
    run("sdxl_train_network", sdxl_lora_args(root, "xl_part") + extra
               + ["--resume", str(root / "xl_part" / "model-step00000002-state")])
    resumed = tensors(root / "xl_part" / "model.safetensors")
    assert resumed.keys() == lora.keys() and all(torch.equal(resumed[k], lora[k]) for k in lora)
    resumed_word = tensors(root / "xl_part" / "model_embeddings" / "zwxq.safetensors")
    assert all(torch.equal(resumed_word[k], final[k]) for k in SDXL_WIDTHS)
    assert logged_losses(root / "xl_part" / "logs") == logged_losses(root / "xl_full" / "logs")


def test_sdxl_pivotal_files_load_in_diffusers_and_bundle(sdxl_workspace):
    """The word beside the LoRA loads in diffusers' StableDiffusionXLPipeline.load_textual_inversion (clip_l with
    text_encoder / tokenizer, clip_g with text_encoder_2 / tokenizer_2) and its token rows there are exactly the
    trained vectors (those of the final training state). With --bundle_embeddings the same vectors are inside the
    LoRA under bundle_emb.zwxq.clip_l / .clip_g, and our LoRA loaders read that file as the plain one."""
    import diffusers

    import networks.lora as lora
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint

    root = sdxl_workspace
    run("sdxl_train_network", sdxl_lora_args(root, "xl_files") + ["--max_train_steps", "2",
                                                                         "--save_state_on_train_end"])
    state = torch.load(root / "xl_files" / "model-state" / "trainable.pt", weights_only=True)
    trained = {"clip_l": state["pivotal_embedding"], "clip_g": state["pivotal_embedding_2"]}
    word = tensors(root / "xl_files" / "model_embeddings" / "zwxq.safetensors")
    assert word.keys() == trained.keys() and all(torch.equal(word[k], trained[k]) for k in trained)

    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=models.vae, unet=models.unet, scheduler=diffusers.EulerDiscreteScheduler(),
        text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
        text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1])
    pipe.load_lora_weights(str(root / "xl_files"), weight_name="model.safetensors")
    pipe.load_textual_inversion(word["clip_g"], token="zwxq", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(word["clip_l"], token="zwxq", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    for key, encoder, tokenizer in [("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]:
        assert pipe.maybe_convert_prompt("a zwxq", tokenizer) == "a zwxq zwxq_1"
        ids = tokenizer.convert_tokens_to_ids(["zwxq", "zwxq_1"])
        rows = encoder.get_input_embeddings().weight.detach()[ids]
        assert torch.equal(rows, trained[key]), f"{key}: diffusers holds other vectors than were trained"

    run("sdxl_train_network", sdxl_lora_args(root, "xl_bundle") + ["--max_train_steps", "2",
                                                                          "--bundle_embeddings"])
    bundled_file = root / "xl_bundle" / "model.safetensors"
    bundled = tensors(bundled_file)
    assert {k for k in bundled if k.startswith("bundle_emb")} == {"bundle_emb.zwxq.clip_l", "bundle_emb.zwxq.clip_g"}
    for key in trained:  # the same run as xl_files, so the same vectors
        assert torch.equal(bundled[f"bundle_emb.zwxq.{key}"], trained[key]), key
    assert not (root / "xl_bundle" / "model_embeddings").exists()
    plain = tensors(root / "xl_files" / "model.safetensors")
    assert all(torch.equal(bundled[k], v) for k, v in plain.items())  # the LoRA itself is the same
    # Our loaders (gen_img's and --dim_from_weights' create_network_from_weights, --network_weights' load_weights)
    # take the network and leave the bundle: it is not a network weight. (Fresh models: diffusers' PEFT layers are
    # in the pipeline's.)
    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    network, weights = lora.create_network_from_weights(1.0, str(bundled_file), None, models.text_encoders,
                                                        models.unet)
    assert weights.keys() == plain.keys()
    network.apply_to(models.text_encoders, models.unet)
    info = network.load_weights(bundled_file)
    assert not info.missing_keys and not info.unexpected_keys


def test_sdxl_full_model_with_pivotal_token(sdxl_workspace):
    """sdxl_train.py: the word trains in both encoders and is saved beside the checkpoint (clip_l / clip_g); the
    checkpoint is a standard SDXL one (the base model's keys and shapes), its U-Net trained and its text encoders,
    which only carried the word, byte-identical to the base model's."""
    root = sdxl_workspace
    run("sdxl_train", sdxl_common(root, "xl_db") + ["--learning_rate", "1e-4", "--max_train_steps", "2",
                                                          "--save_model_as", "safetensors"])
    base, out = tensors(root / "sdxl.safetensors"), tensors(root / "xl_db" / "model.safetensors")
    assert out.keys() == base.keys() and all(out[k].shape == base[k].shape for k in base)
    encoders = [k for k in base if k.startswith("conditioner.embedders.")]
    assert encoders and all(torch.equal(out[k], base[k]) for k in encoders)
    assert any(not torch.equal(out[k], base[k]) for k in base if k.startswith("model.diffusion_model."))
    word, start = tensors(root / "xl_db" / "model_embeddings" / "zwxq.safetensors"), start_vectors(root)
    assert word.keys() == SDXL_WIDTHS.keys()
    for key, width in SDXL_WIDTHS.items():
        assert word[key].shape == (2, width) and not torch.equal(word[key], start[key]), key


@pytest.mark.parametrize("script,flags", [("sdxl_train_network", ["--network_train_unet_only"]), ("sdxl_train", [])])
def test_sdxl_pivotal_token_refuses_the_text_encoder_cache(sdxl_workspace, script, flags):
    """The cache encodes captions once, before training: a word whose vectors train would never reach it."""
    argv = (sdxl_lora_args if script == "sdxl_train_network" else sdxl_common)(sdxl_workspace, f"cache_{script}")
    with pytest.raises(SystemExit) as info:
        run(script, argv + flags + ["--max_train_steps", "1", "--cache_text_encoder_outputs"])
    assert "--cache_text_encoder_outputs" in str(info.value.code) and "--pivotal_token" in str(info.value.code)
