"""Textual inversion on a tiny model: golden losses, exact resume, only the new vectors train, the saved embedding
in diffusers' load_textual_inversion and in WebUI's .pt layout, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.numerics import FAMILY_CASE, assert_outputs_close, check_golden_losses, golden_case_args
from tests.recipe_helpers import logged_losses, run_script, tiny_workspace


def run(argv: list[str], stop_after: int | None = None) -> None:
    run_script("train_textual_inversion", argv, stop_after)




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("ti"), images=4, folder="2_zwxq shape", prefix="zwxq shape, ",
                          models={"sd1": "sd1.safetensors", "sd2-768-v": "sd2v.safetensors"})


def ti_args(root: Path, out: str, model: str = "sd1.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "emb", "--resolution", "64", "--seed", "2",
            "--learning_rate", "5e-2", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--token_string", "zwxq", "--logging_dir", str(root / out / "logs")]


CASES = {
    "sd1_captions_2vec": ("sd1.safetensors", ["--init_word", "shape", "--num_vectors_per_token", "2",
                                              "--max_train_steps", "4"]),
    "sd1_object_template_cached": ("sd1.safetensors", ["--use_object_template", "--cache_latents", "--max_train_steps",
                                                       "3", "--save_model_as", "safetensors"]),
    "sd2v_style_template": ("sd2v.safetensors", ["--use_style_template", "--init_word", "art", "--max_train_steps",
                                                 "3"]),
}
# The option each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "sd1_captions_2vec": ["--num_vectors_per_token", "2"],
    "sd1_object_template_cached": ["--cache_latents"],
    "sd2v_style_template": FAMILY_CASE,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    model, extra = CASES[case]
    extra = golden_case_args(case, extra, COVERS)
    run(ti_args(root, f"golden_{case}", model) + extra)
    losses = logged_losses(root / f"golden_{case}" / "logs")
    check_golden_losses("textual_inversion_losses.json", case, losses)


def test_resume_reproduces_the_uninterrupted_run(workspace):
    from library.textual_inversion import load_embedding

    root = workspace
    extra = ["--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state", "--num_vectors_per_token", "2"]
    run(ti_args(root, "full") + extra)
    run(ti_args(root, "part") + extra, stop_after=3)
    run(ti_args(root, "part") + extra + ["--resume", str(root / "part" / "emb-step00000002-state")])
    a, b = (load_embedding(root / r / "emb.pt", dim=32) for r in ("full", "part"))
    assert torch.equal(a, b) and a.shape == (2, 32)


def test_only_the_new_rows_train():
    """AdamW with weight decay for a few steps: the original table and its gradient are untouched; the new rows
    moved, and the looked-up vectors are the new rows."""
    from library.textual_inversion import AddedTokenEmbedding

    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4)
    table.requires_grad_(False)
    before = table.weight.clone()
    emb = AddedTokenEmbedding(table, torch.randn(2, 4))
    start = emb.added.detach().clone()
    optimizer = torch.optim.AdamW([emb.added], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        out = emb(torch.tensor([[1, 10, 11, 3]]))
        out.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(table.weight, before) and table.weight.grad is None
    assert not torch.equal(emb.added, start)
    looked_up = emb(torch.tensor([[0, 10, 11]]))[0]
    assert torch.equal(looked_up[0], before[0]) and torch.equal(looked_up[1:], emb.added.detach())
    assert emb.weight.shape == (12, 4)


@pytest.mark.numbers
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_saved_embedding_in_diffusers_and_webui_layout(fmt, workspace):
    """diffusers' load_textual_inversion reads our file; its text encoder output for a prompt with the token equals
    ours (our text encoder with the trained vectors installed, as in training)."""
    from diffusers import StableDiffusionPipeline

    from library import textual_inversion as ti
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from library.text_encoding import encode, tokenize

    root = workspace
    out = f"fmt_{fmt}"
    run(ti_args(root, out) + ["--num_vectors_per_token", "3", "--init_word", "shape", "--max_train_steps", "2",
                              "--save_model_as", fmt])
    path = root / out / f"emb.{fmt}"
    vectors = ti.load_embedding(path, dim=32)
    if fmt == "pt":  # WebUI's layout, read independently
        data = torch.load(path, weights_only=True)
        assert data["name"] == "zwxq" and data["step"] == 2 and data["string_to_token"] == {"*": 265}
        assert torch.equal(data["string_to_param"]["*"], vectors)
    else:
        from library.safetensors_io import SafetensorsReader

        with SafetensorsReader(path) as reader:
            assert list(reader.keys()) == ["emb_params"]
            assert reader.metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"

    with read_checkpoint(root / "sd1.safetensors") as checkpoint:
        ours, theirs = instantiate_models(checkpoint), instantiate_models(checkpoint)
    new_tokens = ti.add_tokens(ours.tokenizer, "zwxq", 3)
    ti.install(ours.text_encoder, vectors)
    prompt = "a zwxq shape on a table"
    with torch.no_grad():
        expected = encode(ours.text_encoder, tokenize(ours.tokenizer, [new_tokens.expand(prompt)]))

    pipe = StableDiffusionPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer,
                                   unet=theirs.unet, scheduler=__import__("diffusers").DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="zwxq")
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        got = pipe.text_encoder(ids).last_hidden_state
    assert_outputs_close(got, expected, what="embedding via diffusers' load_textual_inversion vs ours")
    without = "a plain shape"  # prompts without the token are unchanged by the embedding
    with torch.no_grad():
        plain = encode(ours.text_encoder, tokenize(ours.tokenizer, [without]))
        base = encode(theirs.text_encoder, tokenize(theirs.tokenizer, [without]))
    assert torch.equal(plain, base)


def test_continue_from_weights(workspace):
    from library.textual_inversion import load_embedding

    root = workspace
    run(ti_args(root, "first") + ["--max_train_steps", "1", "--save_model_as", "safetensors"])
    run(ti_args(root, "second") + ["--max_train_steps", "1", "--weights", str(root / "first" / "emb.safetensors")])
    first, second = (load_embedding(root / p, dim=32) for p in ("first/emb.safetensors", "second/emb.pt"))
    assert not torch.equal(first, second) and (first - second).abs().max() < 0.2


# ----------------------------------------------------------------------------------------------------------
# Bad input


def expect_error(argv: list[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(argv)
    message = str(info.value.code)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_token_that_collides_with_the_vocabulary(workspace):
    args = ti_args(workspace, "bad1") + ["--max_train_steps", "1"]
    args[args.index("zwxq")] = "dog"  # "dog" is already a vocabulary entry (a word piece)
    expect_error(args, "--token_string 'dog'", "already exist", "choose another")


def test_known_single_token_warns(workspace, caplog):
    import logging

    args = ti_args(workspace, "warn") + ["--max_train_steps", "1", "--caption_prefix", "sks"]
    args[args.index("zwxq")] = "sks"
    with caplog.at_level(logging.WARNING):
        run(args)
    assert any("already a known CLIP token" in r.getMessage() for r in caplog.records)


def test_token_in_no_caption_is_an_error(workspace):
    """The captions say "zwxq shape": a token string in none of them would train nothing."""
    expect_error(ti_args(workspace, "absent") + ["--max_train_steps", "1", "--token_string", "qxvz"],
                 "--token_string 'qxvz'", "no caption contains it", "--use_object_template")
    assert not (workspace / "absent" / "emb.safetensors").exists()


def test_init_word_longer_than_the_vectors(workspace):
    expect_error(ti_args(workspace, "bad2") + ["--init_word", "a red shape", "--num_vectors_per_token", "2",
                                               "--max_train_steps", "1"],
                 "--init_word 'a red shape' is 3 tokens", "--num_vectors_per_token 2")


def test_embedding_of_the_wrong_family(workspace):
    root = workspace
    run(ti_args(root, "sd1_emb") + ["--max_train_steps", "1"])
    expect_error(ti_args(root, "bad3", "sd2v.safetensors") + ["--weights", str(root / "sd1_emb" / "emb.pt"),
                                                             "--max_train_steps", "1"],
                 "emb.pt", "width 32", "48 wide", "made for this model family")
