"""Prompt encoding: parity with diffusers' own prompt encoder, long-prompt chunking, clip skip."""

from __future__ import annotations

import pytest
import torch

from library.families import FAMILIES
from library.text_encoding import encode, tokenize
from library.tiny_models import build_tiny_models
from tests.numerics import assert_outputs_close


@pytest.fixture(scope="module")
def models():
    return {name: build_tiny_models(FAMILIES[name], seed=3) for name in ("sd1", "sd2-512")}


def diffusers_embeds(m, prompt, clip_skip):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=__import__("diffusers").DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip)
    return embeds


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sd1", "sd2-512"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_77_token_encoding_matches_diffusers(models, family, clip_skip):
    m = models[family]
    prompt = ["a photo of a cat, sitting on a red sofa"]
    ours = encode(m.text_encoder, tokenize(m.tokenizer, prompt), clip_skip=clip_skip)
    theirs = diffusers_embeds(m, prompt, None)
    assert ours.shape == (1, 77, m.text_encoder.config.hidden_size)
    assert_outputs_close(ours, theirs, what=f"{family} clip_skip={clip_skip}: ours vs diffusers")


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sd1", "sd2-512"])
def test_clip_skip_2_equals_a_text_encoder_without_its_last_layer(models, family):
    """Independent reference: clip skip 2 is what a CLIP model one layer shorter outputs. (diffusers 0.42's own
    `encode_prompt(clip_skip=...)` cannot serve: it reads `text_encoder.text_model`, gone in transformers 5.)"""
    from transformers import CLIPTextConfig, CLIPTextModel

    m = models[family]
    config = m.text_encoder.config.to_dict()
    config["num_hidden_layers"] -= 1
    shorter = CLIPTextModel(CLIPTextConfig(**config))
    missing, unexpected = shorter.load_state_dict(m.text_encoder.state_dict(), strict=False)
    assert not missing and all(".layers." in k for k in unexpected)
    ids = tokenize(m.tokenizer, ["a photo of a cat, sitting on a red sofa"])
    with torch.no_grad():
        ours = encode(m.text_encoder, ids, clip_skip=2)
        assert_outputs_close(ours, shorter(ids[:, 0]).last_hidden_state, what=f"{family} clip skip 2")
        assert not torch.allclose(ours, encode(m.text_encoder, ids))


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sd1", "sd2-512"])
def test_long_prompt_chunks(models, family):
    m = models[family]
    words = " ".join(f"word{i}" for i in range(120))  # > 75 tokens
    ids = tokenize(m.tokenizer, [words, "short"], max_token_length=225)
    assert ids.shape == (2, 3, 77)
    tok = m.tokenizer
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    # Every window ends in EOS or padding; the short prompt's later windows are empty.
    assert all(int(ids[0, c, -1]) in (tok.eos_token_id, tok.pad_token_id) for c in range(3))
    flat = tok([words], padding="max_length", truncation=True, max_length=227, return_tensors="pt").input_ids[0]
    assert torch.equal(ids[0, 0, 1:76], flat[1:76]) and torch.equal(ids[0, 1, 1:76], flat[76:151])
    states = encode(m.text_encoder, ids)
    assert states.shape == (2, 227, m.text_encoder.config.hidden_size)
    # The first window's states are exactly a plain 77-token encoding of that window.
    window0 = m.text_encoder(ids[:1, 0]).last_hidden_state
    assert_outputs_close(states[0, :76], window0[0, :76], what=f"{family} first window (batch of 2 vs 1)")


def test_bad_max_token_length(models):
    with pytest.raises(ValueError, match="--max_token_length"):
        tokenize(models["sd1"].tokenizer, ["x"], max_token_length=100)


@pytest.mark.numbers
def test_weighted_prompts(models):
    from library.text_encoding import encode_weighted, tokenize_weighted

    m = models["sd1"]
    tok = m.tokenizer
    plain_ids = tokenize(tok, ["a red cat"])
    ids, weights = tokenize_weighted(tok, ["a red cat"])
    assert torch.equal(ids, plain_ids) and torch.all(weights == 1)  # no emphasis: the plain encoding
    assert_outputs_close(encode_weighted(m.text_encoder, ids, weights), encode(m.text_encoder, ids),
                         what="weights of 1 vs plain")

    ids, weights = tokenize_weighted(tok, ["a (red:1.5) cat, [dog]"])
    assert torch.equal(ids, tokenize(tok, ["a red cat, dog"]))  # same tokens, the syntax is gone
    words = tok("a red cat, dog", add_special_tokens=False).input_ids
    red, dog = words.index(tok.convert_tokens_to_ids("red</w>")), words.index(tok.convert_tokens_to_ids("dog</w>"))
    assert weights[0, 0, 1 + red].item() == pytest.approx(1.5)
    assert weights[0, 0, 1 + dog].item() == pytest.approx(1 / 1.1)
    states = encode_weighted(m.text_encoder, ids, weights)
    plain = encode(m.text_encoder, ids)
    # The mean is kept, as WebUI does. It is a mean of O(1) states that nearly cancel (~2e-4), so the check is
    # absolute: measured |difference| 0.8-2.3e-8 across CPU kernel settings (EPYC native / avx2 / default); 2e-7 is
    # 9x that, and leaving out the rescaling moves the mean by 1.2e-6.
    assert states.mean().item() == pytest.approx(plain.mean().item(), abs=2e-7)
    ratio = (states[0, 1 + red] / plain[0, 1 + red]).median().item()
    assert ratio > 1.3  # the emphasised token's states are scaled up

    ids, _ = tokenize_weighted(tok, ["first part BREAK second part"], max_token_length=150)
    assert ids[0, 1, 1] == tok.convert_tokens_to_ids("second</w>")  # BREAK starts the next chunk


@pytest.mark.parametrize("family", ["sd1", "sd2-512"])
def test_unweighted_prompts_tokenize_as_plain(models, family):
    """Without emphasis, the weighted tokenizer gives the plain ids in every window, also for SD 2.x, whose
    tokenizer pads with 0 (not EOS) to the end of each window."""
    from library.text_encoding import tokenize_weighted

    tok = models[family].tokenizer
    captions = ["a red cat", "", "a long caption " + "word " * 100, "exactly " * 75]
    for length in (75, 150, 225):
        ids, _ = tokenize_weighted(tok, captions, max_token_length=length)
        assert torch.equal(ids, tokenize(tok, captions, max_token_length=length)), length
