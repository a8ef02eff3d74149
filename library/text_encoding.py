"""Prompts -> text-encoder conditioning, as kohya and WebUI compute it: 75-token chunks and clip skip.

`--max_token_length 150 / 225` lets a caption use 2 or 3 CLIP windows: the prompt is tokenized to 75*n tokens,
cut into n windows of 75, each encoded as `<BOS> 75 tokens <EOS or PAD>` (77, what CLIP was trained on), and the
outputs are joined back as `<BOS> n*75 middle states <last EOS/PAD>`: a sequence of 75*n + 2 states.

`--clip_skip n` conditions on the n-th hidden state from the end, passed through the final layer norm (n = 1 is
the normal output). Note diffusers' `clip_skip` argument counts one lower (its 1 is kohya's 2). SDXL conditions on
the penultimate hidden state *without* the final layer norm (`final_norm=False`), and on the second encoder's
projected pooled output (`encode_with_pooled`).
"""

from __future__ import annotations

import torch

CHUNK = 75  # tokens per CLIP window, without BOS/EOS


def _chunks(max_token_length: int | None) -> int:
    length = max_token_length or CHUNK
    if length not in (75, 150, 225):
        raise ValueError(f"--max_token_length {max_token_length}: use 75, 150 or 225")
    return length // CHUNK


def tokenize(tokenizer, captions: list[str], max_token_length: int | None = None, *,
             pad_to_longest: bool = False) -> torch.Tensor:
    """Token ids [B, n_chunks, 77] for the captions (n_chunks = max_token_length / 75).

    `pad_to_longest` (train_db's `--no_token_padding`, the original DreamBooth recipe): one window padded only to the
    batch's longest caption, so the U-Net attends to no padding states: [B, 1, L] with L <= 77."""
    if pad_to_longest:
        if _chunks(max_token_length) != 1:
            raise ValueError("--no_token_padding works with one 75-token window; leave out --max_token_length")
        return tokenizer(captions, padding="longest", truncation=True, max_length=CHUNK + 2,
                         return_tensors="pt").input_ids[:, None, :]
    n = _chunks(max_token_length)
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=n * CHUNK + 2,
                    return_tensors="pt").input_ids
    if n == 1:
        return ids[:, None, :]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(n):
        middle = ids[:, 1 + i * CHUNK: 1 + (i + 1) * CHUNK]
        chunk = torch.cat([ids[:, :1], middle, ids[:, -1:]], dim=1).clone()
        chunk[:, 0] = bos
        if pad != eos:
            # Zero-padding tokenizers (SD 2.x): a window cut mid-prompt must still end with EOS, and an empty
            # later window reads <BOS><EOS><PAD>... rather than all padding.
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[cut, -1] = eos
            empty = chunk[:, 1] == pad
            chunk[empty, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def encode(text_encoder, input_ids: torch.Tensor, *, clip_skip: int | None = None,
           final_norm: bool = True) -> torch.Tensor:
    """Conditioning [B, 75*n + 2, D] from token ids [B, n, 77]: the `clip_skip`-th hidden state from the end
    (None: the last), through the final layer norm unless `final_norm` is False."""
    return encode_with_pooled(text_encoder, input_ids, clip_skip=clip_skip, final_norm=final_norm)[0]


def encode_with_pooled(text_encoder, input_ids: torch.Tensor, *, clip_skip: int | None = None,
                       final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode`'s conditioning, and the encoder's projected pooled output of each caption's first window [B, P]
    (kohya and diffusers pool the first window of a long prompt) if the encoder has a projection, else None."""
    b, n, length = input_ids.shape
    flat = input_ids.reshape(b * n, length).to(text_encoder.device)
    skip = clip_skip if clip_skip and clip_skip > 1 else 1
    out = text_encoder(flat, output_hidden_states=skip > 1 or not final_norm)
    if skip == 1 and final_norm:
        states = out.last_hidden_state
    elif final_norm:
        # transformers 5 CLIPTextModel exposes final_layer_norm directly (4.x had it under .text_model).
        norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
        states = norm(out.hidden_states[-skip])
    else:
        states = out.hidden_states[-skip]
    pooled = out.text_embeds.reshape(b, n, -1)[:, 0] if hasattr(out, "text_embeds") else None
    states = states.reshape(b, n, length, -1)
    if n == 1:
        return states[:, 0], pooled
    middle = [states[:, i, 1:-1] for i in range(n)]
    return torch.cat([states[:, 0, :1], *middle, states[:, -1, -1:]], dim=1), pooled


# ----------------------------------------------------------------------------------------------------------
# Weighted prompts: `(word:1.2)`, `[word]`, `BREAK`, as WebUI reads them (--weighted_captions, gen_img prompts)


def tokenize_weighted(tokenizer, captions: list[str], max_token_length: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights, both [B, n_chunks, 77]. Each weighted segment is tokenized on its own (so a
    weight covers exactly its words), `BREAK` pads to the next 75-token chunk, and the prompt is cut at 75*n
    tokens. BOS, EOS and padding get weight 1."""
    n = _chunks(max_token_length)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for caption in captions:
        tokens, weights = _weighted_tokens(tokenizer, caption)
        tokens, weights = tokens[: n * CHUNK], weights[: n * CHUNK]
        ids_chunks, weight_chunks = [], []
        for c in range(n):
            part = tokens[c * CHUNK:(c + 1) * CHUNK]
            part_w = weights[c * CHUNK:(c + 1) * CHUNK]
            filler = CHUNK - len(part)
            # Like the plain tokenizer: EOS right after the text, then padding (EOS or 0 by family) to the window's
            # end; a window full of text ends with EOS.
            ids_chunks.append([bos] + part + [eos] + [pad] * filler)
            weight_chunks.append([1.0] + part_w + [1.0] * filler + [1.0])
        all_ids.append(ids_chunks)
        all_weights.append(weight_chunks)
    return torch.tensor(all_ids), torch.tensor(all_weights, dtype=torch.float32)


def _weighted_tokens(tokenizer, caption: str) -> tuple[list[int], list[float]]:
    """The caption's tokens (no BOS/EOS) and their weights, BREAK padding included, before any cut."""
    from library.captions import BREAK, BREAK_WEIGHT, parse_prompt_weights

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_weights(caption):
        if text == BREAK and weight == BREAK_WEIGHT:
            filler = (-len(tokens)) % CHUNK or (CHUNK if tokens else 0)
            tokens += [eos] + [pad] * (filler - 1) if filler else []
            weights += [1.0] * filler
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        tokens += ids
        weights += [weight] * len(ids)
    return tokens, weights


def token_count(tokenizer, caption: str, *, weighted: bool) -> int:
    """Tokens the caption needs (without BOS/EOS); weighted: as `tokenize_weighted` reads it (BREAK included)."""
    if weighted:
        return len(_weighted_tokens(tokenizer, caption)[0])
    return len(tokenizer(caption, add_special_tokens=False).input_ids)


def fitting_token_length(tokenizer, captions: list[str], *, weighted: bool) -> int:
    """The smallest of 75 / 150 / 225 that holds every caption (225 when even that is too short)."""
    longest = max((token_count(tokenizer, c, weighted=weighted) for c in captions), default=0)
    return min(max(1, -(-longest // CHUNK)), 3) * CHUNK


WEIGHT_NORMALIZATIONS = ("original", "abs", "none")  # kohya gen_img's --emb_normalize_mode


def encode_weighted(text_encoder, input_ids: torch.Tensor, weights: torch.Tensor, *,
                    clip_skip: int | None = None, normalize: str = "original") -> torch.Tensor:
    """Conditioning with per-token emphasis, as WebUI computes it: the hidden states are scaled by their token's
    weight, then the whole is rescaled so its mean equals the unweighted mean (`normalize`: see apply_weights)."""
    return apply_weights(encode(text_encoder, input_ids, clip_skip=clip_skip), weights, normalize=normalize)


def apply_weights(states: torch.Tensor, weights: torch.Tensor, *, normalize: str = "original") -> torch.Tensor:
    """`encode_weighted`'s emphasis on already encoded states [B, 75*n + 2, D], weights [B, n, 77]. `normalize`
    (kohya gen_img's --emb_normalize_mode): after weighting, rescale each caption's states so their mean
    ("original", WebUI's and kohya's default) or their mean absolute value ("abs") is the unweighted one's, or
    leave them ("none")."""
    if normalize not in WEIGHT_NORMALIZATIONS:
        raise ValueError(f"weight normalization {normalize!r}: one of {', '.join(WEIGHT_NORMALIZATIONS)}")
    b, n, length = weights.shape
    if n == 1:
        flat = weights[:, 0]
    else:
        flat = torch.cat([weights[:, 0, :1], *[weights[:, i, 1:-1] for i in range(n)], weights[:, -1, -1:]], dim=1)
    flat = flat.to(states)
    weighted = states * flat.unsqueeze(-1)
    if normalize == "none":
        return weighted

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x.abs() if normalize == "abs" else x).mean(dim=(-2, -1), keepdim=True)
    return (weighted.float() * (mean(states) / mean(weighted))).to(states.dtype)
