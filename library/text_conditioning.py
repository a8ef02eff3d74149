"""Captions -> what the U-Net is conditioned on, as one object the training loop, a ControlNet and sampling pass on
without knowing the model family.

A family with one CLIP-type text encoder (SD 1.x: CLIP ViT-L, SD 2.x: OpenCLIP ViT-H) conditions on its hidden
states only. SDXL adds a second encoder, a pooled text embedding and size/crop ids (the U-Net's
`added_cond_kwargs`); those ride in the same `TextConditioning`, so the loop's call stays
`unet(noisy, t, **conditioning.unet_kwargs())` for every family. How captions become tokens and states (75-token
windows, clip skip, weighted prompts) is `text_encoding.py`; this module decides which encoders run and what of
their output the U-Net gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.text_encoding import encode, encode_weighted, tokenize, tokenize_weighted


@dataclass(frozen=True)
class CaptionEncoding:
    """How captions are encoded (kohya's flags)."""

    max_token_length: int | None = None  # --max_token_length: 75 / 150 / 225 tokens
    clip_skip: int | None = None  # --clip_skip
    weighted: bool = False  # --weighted_captions: (word:1.2) emphasis
    pad_to_longest: bool = False  # train_db --no_token_padding


@dataclass
class TextConditioning:
    """The U-Net's text conditioning for a batch: cross-attention states [B, L, D], and for families that have them
    the pooled text embedding [B, P] and the U-Net's added conditioning (diffusers' `added_cond_kwargs`)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    added_cond: dict[str, torch.Tensor] | None = None

    def to(self, dtype: torch.dtype) -> "TextConditioning":
        return TextConditioning(
            self.hidden_states.to(dtype), None if self.pooled is None else self.pooled.to(dtype),
            None if self.added_cond is None else {k: v.to(dtype) for k, v in self.added_cond.items()})

    def unet_kwargs(self) -> dict:
        """Keyword arguments of diffusers' UNet2DConditionModel (and ControlNetModel) forward."""
        kwargs = {"encoder_hidden_states": self.hidden_states}
        if self.added_cond is not None:
            kwargs["added_cond_kwargs"] = self.added_cond
        return kwargs


class TextConditioner:
    """Captions -> TextConditioning for a family with one CLIP-type text encoder (SD 1.x, SD 2.x). Holds the
    family's tokenizers and text encoders as lists (one here); gradients flow into the encoder if the caller
    enables them (a trained text encoder, LoRA or embedding)."""

    def __init__(self, tokenizers: list, text_encoders: list, encoding: CaptionEncoding = CaptionEncoding()):
        if len(tokenizers) != 1 or len(text_encoders) != 1:
            raise ValueError(f"this conditioner takes one tokenizer and one text encoder, got {len(tokenizers)} "
                             f"and {len(text_encoders)}")
        self.tokenizers, self.text_encoders, self.encoding = list(tokenizers), list(text_encoders), encoding

    def __call__(self, captions: list[str]) -> TextConditioning:
        (tokenizer,), (text_encoder,), e = self.tokenizers, self.text_encoders, self.encoding
        if e.weighted:
            ids, weights = tokenize_weighted(tokenizer, captions, e.max_token_length)
            return TextConditioning(encode_weighted(text_encoder, ids, weights, clip_skip=e.clip_skip))
        ids = tokenize(tokenizer, captions, e.max_token_length, pad_to_longest=e.pad_to_longest)
        return TextConditioning(encode(text_encoder, ids, clip_skip=e.clip_skip))
