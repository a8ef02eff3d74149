"""Captions -> what the U-Net is conditioned on, as one object the training loop, a ControlNet and sampling pass on
without knowing the model family.

A family with one CLIP-type text encoder (SD 1.x: CLIP ViT-L, SD 2.x: OpenCLIP ViT-H) conditions on its hidden
states only. SDXL adds a second encoder, a pooled text embedding and size/crop ids (the U-Net's
`added_cond_kwargs`); those ride in the same `TextConditioning`, so the loop's call stays
`unet(noisy, t, **conditioning.unet_kwargs())` for every family. How captions become tokens and states (75-token
windows, clip skip, weighted prompts) is `text_encoding.py`; this module decides which encoders run and what of
their output the U-Net gets. The family record says which (`ModelFamily.text_conditioning`, `conditioner_for`).

SDXL's size/crop ids come from each image (`SizeConditioning`: its original size, the top-left corner of the crop
taken from it, the size trained or generated), so a conditioner is called with the captions and, for SDXL, one
`SizeConditioning` per caption; the values and their order are diffusers' `_get_add_time_ids` (and kohya's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.families import ModelFamily, TextConditioningKind
from library.text_encoding import (apply_weights, encode, encode_weighted, encode_with_pooled, tokenize,
                                   tokenize_weighted)


@dataclass(frozen=True)
class CaptionEncoding:
    """How captions are encoded (kohya's flags)."""

    max_token_length: int | None = None  # --max_token_length: 75 / 150 / 225 tokens
    clip_skip: int | None = None  # --clip_skip
    weighted: bool = False  # --weighted_captions: (word:1.2) emphasis
    pad_to_longest: bool = False  # train_db --no_token_padding
    weight_normalization: str = "original"  # gen_img --emb_normalize_mode (text_encoding.apply_weights)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one image, in pixels, (height, width) / (top, left) as diffusers orders them."""

    original_size: tuple[int, int]  # the image's size before resizing and cropping
    crop_top_left: tuple[int, int] = (0, 0)  # where the crop starts in the resized image
    target_size: tuple[int, int] | None = None  # the size trained / generated (None: the original size)
    aesthetic_score: float = 6.0  # the refiner's score (diffusers' default for the prompt; 2.5 for the negative)

    def time_ids(self, kind: TextConditioningKind) -> list[float]:
        """The U-Net's `time_ids` for this image: SDXL base (size, crop, target), refiner (size, crop, score)."""
        head = [*self.original_size, *self.crop_top_left]
        if kind is TextConditioningKind.SDXL_REFINER:
            return [float(v) for v in head] + [float(self.aesthetic_score)]
        return [float(v) for v in head + list(self.target_size or self.original_size)]

    @staticmethod
    def pipeline_kwargs(kind: TextConditioningKind, positive: "SizeConditioning",
                        negative: "SizeConditioning") -> dict:
        """The same values as arguments of diffusers' SDXL pipelines (which build the time ids themselves)."""
        if kind is TextConditioningKind.HIDDEN_STATES:
            return {}
        kwargs = {"original_size": positive.original_size, "crops_coords_top_left": positive.crop_top_left,
                  "target_size": positive.target_size or positive.original_size,
                  "negative_original_size": negative.original_size,
                  "negative_crops_coords_top_left": negative.crop_top_left,
                  "negative_target_size": negative.target_size or negative.original_size}
        if kind is TextConditioningKind.SDXL_REFINER:
            kwargs.update(aesthetic_score=positive.aesthetic_score, negative_aesthetic_score=negative.aesthetic_score)
        return kwargs


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

    def rows(self, index) -> "TextConditioning":
        """The conditioning of some of the batch's captions (`index`: a slice or a list of row numbers)."""
        return TextConditioning(
            self.hidden_states[index], None if self.pooled is None else self.pooled[index],
            None if self.added_cond is None else {k: v[index] for k, v in self.added_cond.items()})

    def zeros_like(self) -> "TextConditioning":
        """All-zero conditioning of the same shape (SDXL's unconditional input for an empty negative prompt)."""
        return TextConditioning(
            torch.zeros_like(self.hidden_states), None if self.pooled is None else torch.zeros_like(self.pooled),
            self.added_cond and {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in self.added_cond.items()})

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

    expected_encoders = 1

    def __init__(self, tokenizers: list, text_encoders: list, encoding: CaptionEncoding = CaptionEncoding()):
        if len(tokenizers) != self.expected_encoders or len(text_encoders) != self.expected_encoders:
            raise ValueError(f"{type(self).__name__} takes {self.expected_encoders} tokenizer(s) and text "
                             f"encoder(s), got {len(tokenizers)} and {len(text_encoders)}")
        self.tokenizers, self.text_encoders, self.encoding = list(tokenizers), list(text_encoders), encoding

    @property
    def skips_last_layer(self) -> bool:
        """Whether the conditioning leaves a text encoder's last layer out (--clip_skip 2 or more), so that a
        trained last layer gets no gradient (data_parallel.py must know)."""
        return (self.encoding.clip_skip or 1) > 1

    def __call__(self, captions: list[str], sizes: list[SizeConditioning] | None = None) -> TextConditioning:
        """`sizes`: one per caption; families without size conditioning ignore them."""
        return self.with_sizes(self.encode_text(captions), sizes)

    def with_sizes(self, text: TextConditioning, sizes: list[SizeConditioning] | None) -> TextConditioning:
        """The text part of the conditioning completed with what comes from each image (nothing here). Split from
        `encode_text` so that cached text-encoder outputs (`text_encoder_cache.py`) meet the sizes of each batch."""
        return text

    def encode_text(self, captions: list[str]) -> TextConditioning:
        """What the text encoders make of the captions (all that depends on the text alone)."""
        (tokenizer,), (text_encoder,), e = self.tokenizers, self.text_encoders, self.encoding
        if e.weighted:
            ids, weights = tokenize_weighted(tokenizer, captions, e.max_token_length)
            return TextConditioning(encode_weighted(text_encoder, ids, weights, clip_skip=e.clip_skip,
                                                    normalize=e.weight_normalization))
        ids = tokenize(tokenizer, captions, e.max_token_length, pad_to_longest=e.pad_to_longest)
        return TextConditioning(encode(text_encoder, ids, clip_skip=e.clip_skip))


class SDXLTextConditioner(TextConditioner):
    """SDXL base: CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states (no final layer norm) side by side
    [B, L, 768 + 1280], bigG's projected pooled output [B, 1280], and each image's size/crop time ids [B, 6]."""

    expected_encoders = 2
    kind = TextConditioningKind.SDXL

    def __init__(self, tokenizers: list, text_encoders: list, encoding: CaptionEncoding = CaptionEncoding()):
        super().__init__(tokenizers, text_encoders, encoding)
        if encoding.clip_skip not in (None, 1):
            # kohya ignores it with a warning; a flag that does nothing is worse than a clear refusal.
            raise ValueError(f"--clip_skip {encoding.clip_skip}: SDXL conditions on fixed layers (each encoder's "
                             "penultimate hidden state); remove --clip_skip")

    @property
    def skips_last_layer(self) -> bool:
        return True  # CLIP ViT-L's penultimate hidden state (bigG's last layer still makes the pooled output)

    def with_sizes(self, text: TextConditioning, sizes: list[SizeConditioning] | None) -> TextConditioning:
        rows = text.hidden_states.shape[0]
        if sizes is None or len(sizes) != rows:
            raise ValueError(f"{type(self).__name__}: one SizeConditioning per caption is needed "
                             f"({rows} captions, {0 if sizes is None else len(sizes)} sizes)")
        time_ids = torch.tensor([size.time_ids(self.kind) for size in sizes], device=text.hidden_states.device)
        return TextConditioning(text.hidden_states, text.pooled, {"text_embeds": text.pooled, "time_ids": time_ids})

    def encode_text(self, captions: list[str]) -> TextConditioning:
        e = self.encoding
        states, pooled = [], None
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            if e.weighted:
                ids, weights = tokenize_weighted(tokenizer, captions, e.max_token_length)
            else:
                ids = tokenize(tokenizer, captions, e.max_token_length, pad_to_longest=e.pad_to_longest)
            hidden, pooled_here = encode_with_pooled(text_encoder, ids, clip_skip=2, final_norm=False)
            states.append(apply_weights(hidden, weights, normalize=e.weight_normalization) if e.weighted else hidden)
            pooled = pooled_here if pooled_here is not None else pooled  # bigG's (the encoder with a projection)
        return TextConditioning(torch.cat(states, dim=-1), pooled)


class SDXLRefinerTextConditioner(SDXLTextConditioner):
    """SDXL refiner: bigG only, and time ids of size, crop and aesthetic score [B, 5]."""

    expected_encoders = 1
    kind = TextConditioningKind.SDXL_REFINER

    @property
    def skips_last_layer(self) -> bool:
        return False  # bigG's penultimate hidden state, and its last layer for the pooled output


_CONDITIONERS = {TextConditioningKind.HIDDEN_STATES: TextConditioner, TextConditioningKind.SDXL: SDXLTextConditioner,
                 TextConditioningKind.SDXL_REFINER: SDXLRefinerTextConditioner}


def conditioner_for(family: ModelFamily, tokenizers: list, text_encoders: list,
                    encoding: CaptionEncoding = CaptionEncoding()) -> TextConditioner:
    """The family's conditioner over its tokenizers and text encoders (in `family.text_encoders` order)."""
    return _CONDITIONERS[family.text_conditioning](tokenizers, text_encoders, encoding)
