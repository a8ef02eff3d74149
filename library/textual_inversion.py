"""Textual inversion: new tokens for the text encoder, their embedding vectors, and the files WebUI, ComfyUI and
diffusers read them from.

The new vectors live in their own parameter (`AddedTokenEmbedding.added`), beside the frozen original table, so
training them cannot touch any other row: the rest of the table stays bit-identical by construction (kohya instead
updates the whole table and copies the old rows back after every step).

Files: `.safetensors` with `emb_params` [n, dim] (kohya, WebUI, ComfyUI, diffusers), and the WebUI `.pt` layout
(`string_to_param["*"]`, `string_to_token`, `name`, `step`), also written for `--save_model_as ckpt` as kohya does.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The prompt templates kohya (and the original textual-inversion code) use with --use_object_template /
# --use_style_template; "{}" is the token string.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
    "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
    "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class NewTokens:
    token_string: str
    tokens: tuple[str, ...]  # token_string, token_string1, ... (kohya's names for the extra vectors)
    ids: tuple[int, ...]

    @property
    def prompt_text(self) -> str:
        """What the token string stands for in a prompt: all its vectors, in order."""
        return " ".join(self.tokens)

    def expand(self, text: str) -> str:
        return text.replace(self.token_string, self.prompt_text) if len(self.tokens) > 1 else text


def token_names(token_string: str, num_vectors: int) -> tuple[str, ...]:
    return (token_string, *(f"{token_string}{i}" for i in range(1, num_vectors)))


def add_tokens(tokenizer, token_string: str, num_vectors: int) -> NewTokens:
    """Register the new tokens with the tokenizer. A token that would reuse an existing id (the string is already a
    vocabulary entry) is an error; a string the tokenizer already reads as one known token is a warning (the new
    token takes that word over in prompts)."""
    if not token_string or any(c.isspace() for c in token_string):
        raise ValueError(f"--token_string {token_string!r}: give one word without spaces, e.g. 'mychar'")
    if num_vectors < 1:
        raise ValueError(f"--num_vectors_per_token {num_vectors}: must be at least 1")
    known = tokenizer(token_string, add_special_tokens=False).input_ids
    if len(known) == 1:
        logger.warning("--token_string %r is already a known CLIP token (id %d); the new embedding replaces its "
                       "meaning wherever it appears in prompts. A made-up word avoids that.", token_string, known[0])
    names = token_names(token_string, num_vectors)
    before = len(tokenizer)
    tokenizer.add_tokens(list(names))
    ids = tuple(tokenizer.convert_tokens_to_ids(list(names)))
    collisions = [name for name, i in zip(names, ids) if i < before]
    if collisions:
        raise ValueError(f"--token_string {token_string!r}: {', '.join(collisions)} already exist(s) in the "
                         "tokenizer's vocabulary, so no new embedding could be added for it; choose another token "
                         "string")
    return NewTokens(token_string, names, ids)


def init_vectors(tokenizer, embedding: nn.Embedding, init_word: str | None, num_vectors: int) -> torch.Tensor:
    """Starting vectors [num_vectors, dim]: the init word's token embeddings, repeated to fill (kohya); without an
    init word, the mean of the table (a neutral start)."""
    weight = embedding.weight.detach()
    if not init_word:
        return weight.float().mean(0, keepdim=True).repeat(num_vectors, 1)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(ids) > num_vectors:
        raise ValueError(f"--init_word {init_word!r} is {len(ids)} tokens, more than --num_vectors_per_token "
                         f"{num_vectors}; use a shorter init word or more vectors")
    vectors = weight[torch.tensor(ids)].float()
    return vectors.repeat((num_vectors + len(ids) - 1) // len(ids), 1)[:num_vectors]


class AddedTokenEmbedding(nn.Module):
    """A token embedding with new rows after the original table: ids below `num_original` read the frozen table,
    the others read `added` (the trained vectors)."""

    def __init__(self, original: nn.Embedding, added: torch.Tensor):
        super().__init__()
        self.original = original
        self.num_original = original.num_embeddings
        self.added = nn.Parameter(added.to(original.weight.device))

    @property
    def weight(self) -> torch.Tensor:  # the whole table, for code that reads it (e.g. saving a text encoder)
        return torch.cat([self.original.weight, self.added.to(self.original.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.num_original
        base = self.original(input_ids.clamp(max=self.num_original - 1))
        if not is_new.any():
            # Keep the new vectors in the graph (zero gradient): a batch whose captions lack the token (reg images)
            # must still backpropagate and step, as with a whole trainable table.
            return base + 0.0 * self.added.sum().to(base.dtype)
        new = self.added[(input_ids - self.num_original).clamp(min=0)].to(base.dtype)
        return torch.where(is_new[..., None], new, base)


def install(text_encoder, vectors: torch.Tensor) -> AddedTokenEmbedding:
    """Give the text encoder the new rows (after its `len(tokenizer)` - n original ones)."""
    embeddings = text_encoder.embeddings if hasattr(text_encoder, "embeddings") else text_encoder.text_model.embeddings
    original = embeddings.token_embedding
    if isinstance(original, AddedTokenEmbedding):
        raise ValueError("the text encoder already has added tokens")
    added = AddedTokenEmbedding(original, vectors.to(original.weight.dtype))
    embeddings.token_embedding = added
    return added


# ----------------------------------------------------------------------------------------------------------
# Files


def save_embedding(path: Path, vectors: torch.Tensor, *, token_string: str, step: int,
                   metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """`.safetensors` (emb_params + metadata) or the WebUI `.pt` layout (`.pt` / `.ckpt`), atomically."""
    from library.atomic_files import atomic_file

    vectors = vectors.detach().to("cpu", dtype or vectors.dtype).contiguous()
    path = Path(path)
    if path.suffix == ".safetensors":
        from library.safetensors_io import save_tensors

        save_tensors(path, {"emb_params": vectors}, dict(metadata or {}))
        return path
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token_string, "step": step,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    with atomic_file(path) as tmp:
        torch.save(data, tmp)
    return path


def load_embedding(path: Path, *, dim: int) -> torch.Tensor:
    """The vectors [n, dim] of an embedding file (kohya / WebUI `.safetensors` `emb_params`, WebUI `.pt`
    `string_to_param`, a diffusers `{token: tensor}` file), checked against the text encoder's width."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: no such embedding file")
    try:
        if path.suffix == ".safetensors":
            from library.safetensors_io import SafetensorsReader

            with SafetensorsReader(path) as reader:
                data = {k: reader.read(k) for k in reader.keys()}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise EmbeddingFileError(f"{path}: cannot be read as an embedding ({e})") from None
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else None
    elif isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))  # diffusers' {token: tensor}
    else:
        keys = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
        raise EmbeddingFileError(f"{path}: not an embedding file (expected emb_params or string_to_param; found "
                                 f"{keys})")
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingFileError(f"{path}: the embedding holds no tensor")
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() != 2 else vectors
    if vectors.shape[-1] != dim:
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(vectors.shape[-1], "another model")
        raise EmbeddingFileError(f"{path}: vectors of width {vectors.shape[-1]} (an embedding for {family}), but "
                                 f"this model's text encoder is {dim} wide; use an embedding made for this model "
                                 "family")
    return vectors.float()


def template_caption(templates: tuple[str, ...], new_tokens: NewTokens, rng: random.Random) -> str:
    return rng.choice(templates).format(new_tokens.prompt_text)
