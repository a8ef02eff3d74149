"""The text conditioning the training loop passes on without knowing the family: what the conditioner returns for
SD 1.x / 2.x, how it reaches the U-Net, and that the loop itself makes no tokenizer or text-encoder call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.families import FAMILIES, TextConditioningKind
from library.text_conditioning import (CaptionEncoding, SizeConditioning, TextConditioner, TextConditioning,
                                       conditioner_for)
from library.tiny_models import build_tiny_models
from tests.numerics import assert_outputs_close
from tests.test_text_encoding import diffusers_embeds

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return {name: build_tiny_models(FAMILIES[name], seed=3) for name in ("sd1", "sd2-512", "sdxl", "sdxl-refiner")}


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
    with pytest.raises(ValueError, match="TextConditioner takes 1 tokenizer.* got 2 and 2"):
        TextConditioner([m.tokenizer] * 2, [m.text_encoder] * 2)


def sdxl_pipeline(m):
    """diffusers' own SDXL pipeline (base or refiner) around the same models: an independent prompt encoder."""
    import diffusers

    parts = dict(vae=m.vae, unet=m.unet, scheduler=diffusers.EulerDiscreteScheduler(), text_encoder_2=m.text_encoders[-1],
                 tokenizer_2=m.tokenizers[-1])
    if m.family.text_conditioning is TextConditioningKind.SDXL:
        return diffusers.StableDiffusionXLPipeline(text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], **parts)
    return diffusers.StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                      **parts)


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdxl_conditioning_matches_diffusers_encode_prompt(models, family):
    """Hidden states (penultimate layers, no final norm, side by side), the pooled embedding and the time ids are
    what StableDiffusionXL(Img2Img)Pipeline computes for the same prompts and sizes."""
    m = models[family]
    prompts = ["a photo of a cat, sitting on a red sofa", "a dog!"]
    sizes = [SizeConditioning((768, 1024), (16, 32), (512, 640)), SizeConditioning((512, 512), aesthetic_score=2.5)]
    cond = conditioner_for(m.family, m.tokenizers, m.text_encoders)(prompts, sizes)
    pipe = sdxl_pipeline(m)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert_outputs_close(cond.hidden_states, embeds, what=f"{family} hidden states vs diffusers")
    assert_outputs_close(cond.pooled, pooled, what=f"{family} pooled vs diffusers")
    assert cond.added_cond["text_embeds"] is cond.pooled
    for row, size in zip(cond.added_cond["time_ids"], sizes):
        if family == "sdxl":
            theirs = pipe._get_add_time_ids(size.original_size, size.crop_top_left, size.target_size or
                                            size.original_size, torch.float32,
                                            text_encoder_projection_dim=pooled.shape[-1])
        else:
            theirs, _ = pipe._get_add_time_ids(size.original_size, size.crop_top_left, size.original_size,
                                               size.aesthetic_score, 2.5, size.original_size, size.crop_top_left,
                                               size.original_size, torch.float32,
                                               text_encoder_projection_dim=pooled.shape[-1])
        assert torch.equal(row, theirs[0])
    with torch.no_grad():  # and the U-Net takes it as it is
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert m.unet(noise, 10, **cond.unet_kwargs()).sample.shape == noise.shape


@pytest.mark.numbers
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_sdxl_long_prompt_is_encoded_window_by_window(models, weighted):
    """A 105-token prompt with a 150-token limit: two 75-token windows through both encoders, joined as kohya and
    WebUI join them (BOS, each window's tokens, the last EOS). Each window equals what diffusers' encode_prompt gives
    for that window's text alone (it reads one window), the pooled embedding is the first window's (kohya's and
    diffusers' rule). Without weights in the text, the weighted parser gives the same windows."""
    m = models["sdxl"]
    head, words = "a photo of a cat", 100  # 5 + 100 one-token words: window 1 holds the rest, 30 words
    text = head + " word" * words
    encoding = CaptionEncoding(max_token_length=150, weighted=weighted)
    cond = conditioner_for(m.family, m.tokenizers, m.text_encoders, encoding)([text], [SizeConditioning((64, 64))])
    assert cond.hidden_states.shape[1] == 152
    pipe = sdxl_pipeline(m)
    first, _, pooled, _ = pipe.encode_prompt([text], device="cpu", do_classifier_free_guidance=False)  # truncated
    second, _, _, _ = pipe.encode_prompt(["word" + " word" * 29], device="cpu", do_classifier_free_guidance=False)
    assert_outputs_close(cond.hidden_states[:, :76], first[:, :76], what="window 1 vs diffusers")
    assert_outputs_close(cond.hidden_states[:, 76:], second[:, 1:], what="window 2 vs diffusers")
    assert_outputs_close(cond.pooled, pooled, what="pooled of window 1 vs diffusers")


def test_sdxl_conditioner_needs_sizes_and_refuses_clip_skip(models):
    m = models["sdxl"]
    conditioner = conditioner_for(m.family, m.tokenizers, m.text_encoders)
    with pytest.raises(ValueError, match="one SizeConditioning per caption"):
        conditioner(["a cat"])
    with pytest.raises(ValueError, match="--clip_skip 2: SDXL conditions on fixed layers"):
        conditioner_for(m.family, m.tokenizers, m.text_encoders, CaptionEncoding(clip_skip=2))
    long = conditioner(["word " * 100], [SizeConditioning((64, 64))])
    assert long.hidden_states.shape == (1, 77, 80)  # cut at 75 tokens unless --max_token_length
    longer = conditioner_for(m.family, m.tokenizers, m.text_encoders, CaptionEncoding(max_token_length=150))(
        ["word " * 100], [SizeConditioning((64, 64))])
    assert longer.hidden_states.shape == (1, 152, 80) and longer.pooled.shape == (1, 48)
    # the pooled embedding is the first window's (kohya, diffusers)
    assert_outputs_close(longer.pooled, long.pooled, what="pooled output of the first 75-token window")
    weighted = conditioner_for(m.family, m.tokenizers, m.text_encoders, CaptionEncoding(weighted=True))(
        ["a (dog:1.5)"], [SizeConditioning((64, 64))])
    plain = conditioner(["a (dog:1.5)"], [SizeConditioning((64, 64))])
    assert not torch.allclose(plain.hidden_states, weighted.hidden_states)


def test_the_training_loop_makes_no_tokenizer_or_text_encoder_call():
    """What differs between families stays in the family's conditioner (issue: SDXL's second encoder, pooled and
    size conditioning must not become branches in the loop)."""
    import re

    source = (ROOT / "library" / "training_loop.py").read_text().lower()
    # (the task's `train_text_encoder` flag, which turns gradients on, and `clip_grad_norm_` are not such calls)
    for pattern in (r"tokeniz", r"text_encoder\b(?!_)(?<!train_text_encoder)", r"text_encoding",
                    r"(?<![.\w])encode(_weighted)?\(", r"clip_?skip", r"cliptext"):
        assert not re.search(pattern, source), pattern
