"""The text conditioning the training loop passes on without knowing the family: what the conditioner returns for
SD 1.x / 2.x, how it reaches the U-Net, and that the loop itself makes no tokenizer or text-encoder call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.families import FAMILIES
from library.text_conditioning import CaptionEncoding, TextConditioner, TextConditioning
from library.tiny_models import build_tiny_models
from tests.numerics import assert_outputs_close
from tests.test_text_encoding import diffusers_embeds

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return {name: build_tiny_models(FAMILIES[name], seed=3) for name in ("sd1", "sd2-512")}


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sd1", "sd2-512"])
def test_one_encoder_families_condition_on_hidden_states_only(models, family):
    m = models[family]
    prompt = ["a photo of a cat, sitting on a red sofa", "a dog"]
    cond = TextConditioner([m.tokenizer], [m.text_encoder])(prompt)
    assert cond.pooled is None and cond.added_cond is None
    assert_outputs_close(cond.hidden_states, diffusers_embeds(m, prompt, None),
                         what=f"{family} conditioner vs diffusers' encode_prompt")
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}


def test_caption_encoding_flags_reach_the_encoder(models):
    m = models["sd1"]
    long = ["word " * 100]
    assert TextConditioner([m.tokenizer], [m.text_encoder], CaptionEncoding(max_token_length=150))(
        long).hidden_states.shape[1] == 152
    shortest = TextConditioner([m.tokenizer], [m.text_encoder], CaptionEncoding(pad_to_longest=True))(["a dog"])
    assert shortest.hidden_states.shape[1] == 4  # <BOS> a dog <EOS>
    plain = TextConditioner([m.tokenizer], [m.text_encoder])(["a (dog:1.5)"]).hidden_states
    weighted = TextConditioner([m.tokenizer], [m.text_encoder], CaptionEncoding(weighted=True))(
        ["a (dog:1.5)"]).hidden_states
    assert not torch.allclose(plain, weighted)


def test_added_conditioning_reaches_the_unet_as_added_cond_kwargs():
    cond = TextConditioning(torch.ones(1, 3, 4), torch.ones(1, 2),
                            {"text_embeds": torch.ones(1, 2), "time_ids": torch.ones(1, 6)})
    half = cond.to(torch.bfloat16)
    assert half.hidden_states.dtype == half.pooled.dtype == half.added_cond["time_ids"].dtype == torch.bfloat16
    assert set(half.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}


def test_a_one_encoder_conditioner_refuses_two_encoders(models):
    m = models["sd1"]
    with pytest.raises(ValueError, match="one tokenizer and one text encoder, got 2 and 2"):
        TextConditioner([m.tokenizer] * 2, [m.text_encoder] * 2)


def test_the_training_loop_makes_no_tokenizer_or_text_encoder_call():
    """What differs between families stays in the family's conditioner (issue: SDXL's second encoder, pooled and
    size conditioning must not become branches in the loop)."""
    import re

    source = (ROOT / "library" / "training_loop.py").read_text().lower()
    # (the task's `train_text_encoder` flag, which turns gradients on, and `clip_grad_norm_` are not such calls)
    for pattern in (r"tokeniz", r"text_encoder\b(?!_)(?<!train_text_encoder)", r"text_encoding",
                    r"(?<![.\w])encode(_weighted)?\(", r"clip_?skip", r"cliptext"):
        assert not re.search(pattern, source), pattern
