"""sdxl_train_textual_inversion.py on a tiny SDXL base model: golden losses, exact resume, only the new rows of both
token tables train, the saved clip_l / clip_g file in diffusers' StableDiffusionXLPipeline.load_textual_inversion,
--weights, and each family sent to its script."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.numerics import (CAPTIONS_LOST, FP32_OUTPUT_REL, PlantedBug, assert_outputs_close, check_golden_losses,
                            golden_case_args, relative_deviation)
from tests.recipe_helpers import logged_losses, run_script


def run(argv: list[str], stop_after: int | None = None, script: str = "sdxl_train_textual_inversion") -> None:
    run_script(script, argv, stop_after)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.recipe_helpers import tiny_workspace

    return tiny_workspace(tmp_path_factory.mktemp("sdxl_ti"), images=4, folder="2_zwxq shape", prefix="zwxq shape, ",
                          models={"sdxl": "sdxl.safetensors", "sd1": "sd1.safetensors"})


def ti_args(root: Path, out: str, model: str = "sdxl.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "emb", "--resolution", "64", "--seed", "2",
            "--learning_rate", "5e-2", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--token_string", "zwxq", "--logging_dir", str(root / out / "logs")]


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The file as WebUI / ComfyUI read it: a dict of tensors (safetensors, or a torch .pt)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _init_word_only_in_the_first_encoder():
    """Planted: OpenCLIP bigG's new vectors ignore --init_word and start from its table mean (what a trainer that
    initialises only the first encoder's word, or reads the init word in the wrong table, would do)."""
    from library import textual_inversion as ti

    original, calls = ti.init_vectors, []

    def first_encoder_only(tokenizer, embedding, init_word, num_vectors, **kwargs):
        calls.append(init_word)
        return original(tokenizer, embedding, init_word if len(calls) == 1 else None, num_vectors, **kwargs)

    ti.init_vectors = first_encoder_only
    return lambda: setattr(ti, "init_vectors", original)


INIT_ONLY_CLIP_L = PlantedBug("bigG's new vectors ignore --init_word", _init_word_only_in_the_first_encoder)

CASES = {
    "sdxl_captions_2vec": ["--init_word", "shape", "--num_vectors_per_token", "2", "--max_train_steps", "4"],
    "sdxl_style_template_cached": ["--use_style_template", "--init_word", "art", "--cache_latents",
                                   "--max_train_steps", "3", "--save_model_as", "safetensors"],
}
# What each case is there for (tests/golden/README.md: what removing it / planting the bug does to the losses).
COVERS = {
    "sdxl_captions_2vec": INIT_ONLY_CLIP_L,
    "sdxl_style_template_cached": CAPTIONS_LOST,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    run(ti_args(root, f"golden_{case}") + golden_case_args(case, CASES[case], COVERS))
    check_golden_losses("sdxl_textual_inversion_losses.json", case, logged_losses(root / f"golden_{case}" / "logs"))
    saved = root / f"golden_{case}" / ("emb.safetensors" if "safetensors" in CASES[case] else "emb.pt")
    vectors = read_embedding(saved)
    n = 2 if "--num_vectors_per_token" in CASES[case] else 1
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (n, 32), "clip_g": (n, 48)}
    assert all(torch.isfinite(v).all() for v in vectors.values())
    if saved.suffix == ".safetensors":
        from library.safetensors_io import SafetensorsReader

        with SafetensorsReader(saved) as reader:
            assert reader.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
            assert reader.metadata["ss_token_string"] == "zwxq"


def test_resume_reproduces_the_uninterrupted_run_and_weights_continue(workspace):
    """Stopped after step 3 and resumed from the step-2 state: both encoders' vectors equal the uninterrupted run's.
    Then --weights continues from that (.pt) file."""
    root = workspace
    extra = ["--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state", "--num_vectors_per_token", "2",
             "--init_word", "shape"]
    run(ti_args(root, "full") + extra)
    run(ti_args(root, "part") + extra, stop_after=3)
    run(ti_args(root, "part") + extra + ["--resume", str(root / "part" / "emb-step00000002-state")])
    full, part = (read_embedding(root / r / "emb.pt") for r in ("full", "part"))
    assert set(full) == set(part) == {"clip_l", "clip_g"}
    for key in full:
        assert torch.equal(full[key], part[key]), key
    step2 = read_embedding(root / "full" / "emb-step00000002.pt")
    assert all(not torch.equal(step2[k], full[k]) for k in full)  # both encoders' vectors trained

    run(ti_args(root, "more") + ["--max_train_steps", "1", "--num_vectors_per_token", "2", "--save_model_as",
                                 "safetensors", "--weights", str(root / "full" / "emb.pt")])
    more = read_embedding(root / "more" / "emb.safetensors")
    for key in full:
        assert not torch.equal(full[key], more[key]) and (full[key] - more[key]).abs().max() < 0.2, key


def test_only_the_new_rows_of_both_tables_train(workspace, monkeypatch):
    """After training, every weight of both text encoders (their original token tables included), of the U-Net and
    of the VAE is bit-identical to the base model's; only the new vectors moved away from the init word's."""
    from library import textual_inversion as ti
    from library import training_setup
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint

    trainers = []
    original_run = training_setup.run_trainer

    def keep(trainer, args):
        trainers.append(trainer)
        return original_run(trainer, args)

    monkeypatch.setattr(training_setup, "run_trainer", keep)
    root = workspace
    run(ti_args(root, "rows") + ["--max_train_steps", "3", "--init_word", "shape", "--num_vectors_per_token", "2",
                                 "--gradient_checkpointing"])
    (trainer,) = trainers
    encoders = trainer.text_conditioner.text_encoders
    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        base = instantiate_models(checkpoint)
    assert len(encoders) == 2
    with ti.original_token_embedding(encoders):
        for name, ours, theirs in [("unet", trainer.unet, base.unet), ("vae", trainer.vae, base.vae),
                                   *((f"text_encoder {i}", e, b) for i, (e, b) in
                                     enumerate(zip(encoders, base.text_encoders)))]:
            mine, reference = ours.state_dict(), theirs.state_dict()
            assert mine.keys() == reference.keys(), name
            changed = [k for k in mine if not torch.equal(mine[k].cpu(), reference[k])]
            assert not changed, f"{name}: {changed[:5]}"
    for encoder, tokenizer, table in zip(encoders, base.tokenizers, (e.get_input_embeddings() for e in
                                                                     base.text_encoders)):
        layer = encoder.get_input_embeddings()
        assert isinstance(layer, ti.AddedTokenEmbedding) and layer.added.shape == (2, table.embedding_dim)
        start = ti.init_vectors(tokenizer, table, "shape", 2)
        assert not torch.equal(layer.added.detach().cpu(), start)
        assert (layer.added.detach().cpu() - start).abs().max() < 0.5  # 3 Adam steps of 5e-2


@pytest.mark.numbers
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_saved_embedding_in_diffusers_sdxl_pipeline(fmt, workspace):
    """diffusers' StableDiffusionXLPipeline.load_textual_inversion, called for each encoder as diffusers documents
    for SDXL (clip_g with text_encoder_2 / tokenizer_2, clip_l with text_encoder / tokenizer), reads our file; its
    prompt embeddings and pooled output for a prompt with the word equal our conditioner's with the trained
    vectors. Not vacuous: the trained vectors move every part of the output (both encoders' hidden states, the
    pooled output) by far more than the tolerance from what the starting vectors give."""
    import diffusers

    from library import textual_inversion as ti
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from library.text_conditioning import conditioner_for

    root = workspace
    out = f"fmt_{fmt}"
    run(ti_args(root, out) + ["--num_vectors_per_token", "3", "--init_word", "shape", "--max_train_steps", "2",
                              "--save_model_as", fmt])
    state_dict = read_embedding(root / out / f"emb.{fmt}")
    assert sorted(state_dict) == ["clip_g", "clip_l"]
    assert state_dict["clip_l"].shape == (3, 32) and state_dict["clip_g"].shape == (3, 48)

    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        ours, start, theirs = (instantiate_models(checkpoint) for _ in range(3))
    prompt = "a zwxq shape on a table"

    def our_conditioning(models, vectors):
        words = [ti.add_tokens(tokenizer, "zwxq", 3) for tokenizer in models.tokenizers]
        for encoder, v in zip(models.text_encoders, vectors):
            ti.install(encoder, v)
        with torch.no_grad():
            return conditioner_for(models.family, models.tokenizers, models.text_encoders).encode_text(
                [words[0].expand(prompt)])

    # Our model, with the file's vectors read our way (clip_l, clip_g in the family's order)
    vectors = ti.load_encoder_embeddings(root / out / f"emb.{fmt}", [("clip_l", 32), ("clip_g", 48)], "SDXL")
    expected = our_conditioning(ours, vectors)
    initial = our_conditioning(start, [ti.init_vectors(tokenizer, encoder.get_input_embeddings(), "shape", 3)
                                       for tokenizer, encoder in zip(start.tokenizers, start.text_encoders)])

    pipe = diffusers.StableDiffusionXLPipeline(
        vae=theirs.vae, unet=theirs.unet, scheduler=diffusers.EulerDiscreteScheduler(),
        text_encoder=theirs.text_encoders[0], tokenizer=theirs.tokenizers[0],
        text_encoder_2=theirs.text_encoders[1], tokenizer_2=theirs.tokenizers[1])
    pipe.load_textual_inversion(state_dict["clip_g"], token="zwxq", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state_dict["clip_l"], token="zwxq", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert_outputs_close(embeds, expected.hidden_states, what="SDXL embedding via diffusers vs ours: hidden states")
    assert_outputs_close(pooled, expected.pooled, what="SDXL embedding via diffusers vs ours: pooled")

    width_l = 32  # CLIP ViT-L's part of the hidden states comes first
    for what, trained, before in [("clip_l states", expected.hidden_states[..., :width_l],
                                   initial.hidden_states[..., :width_l]),
                                  ("clip_g states", expected.hidden_states[..., width_l:],
                                   initial.hidden_states[..., width_l:]),
                                  ("pooled", expected.pooled, initial.pooled)]:
        moved = relative_deviation(trained, before)
        assert moved > 10 * FP32_OUTPUT_REL, f"{what}: the trained word moved the output by only {moved:.3g}"


# ----------------------------------------------------------------------------------------------------------
# Bad input


def expect_error(argv: list[str], *needles: str, script: str = "sdxl_train_textual_inversion") -> None:
    with pytest.raises(SystemExit) as info:
        run(argv, script=script)
    message = str(info.value.code)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_each_family_is_sent_to_its_script(workspace):
    root = workspace
    expect_error(ti_args(root, "bad_sd1", "sd1.safetensors") + ["--max_train_steps", "1"],
                 "sd1.safetensors", "sdxl_train_textual_inversion.py handles", "use train_textual_inversion.py")
    expect_error(ti_args(root, "bad_sdxl") + ["--max_train_steps", "1"],
                 "sdxl.safetensors", "train_textual_inversion.py handles", "use sdxl_train_textual_inversion.py",
                 script="train_textual_inversion")


def test_embedding_of_the_other_family_is_refused(workspace):
    """An SD 1.x embedding as --weights for SDXL, and an SDXL one for SD 1.x, each named with what is wrong."""
    root = workspace
    run(ti_args(root, "sd1_emb", "sd1.safetensors") + ["--max_train_steps", "1"], script="train_textual_inversion")
    run(ti_args(root, "sdxl_emb") + ["--max_train_steps", "1", "--save_model_as", "safetensors"])
    expect_error(ti_args(root, "bad_w1") + ["--weights", str(root / "sd1_emb" / "emb.pt"), "--max_train_steps", "1"],
                 "emb.pt", "one tensor per text encoder (clip_l, clip_g)", "made for this model family")
    expect_error(ti_args(root, "bad_w2", "sd1.safetensors") + ["--weights", str(root / "sdxl_emb" / "emb.safetensors"),
                                                               "--max_train_steps", "1"],
                 "emb.safetensors", "several text encoders", script="train_textual_inversion")
    expect_error(ti_args(root, "bad_w3") + ["--weights", str(root / "sdxl_emb" / "emb.safetensors"),
                                            "--num_vectors_per_token", "2", "--max_train_steps", "1"],
                 "holds 1 vector(s)", "--num_vectors_per_token 1")
