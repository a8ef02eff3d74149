"""Pivotal tuning: a new token trained with a LoRA (train_network.py) or a full model (train_db.py), saved with
the model; and frozen embeddings loaded into training (--textual_inversion_embeddings)."""

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
