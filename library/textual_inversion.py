"""Textual inversion: new tokens for the text encoder, their embedding vectors, and the files WebUI, ComfyUI and
diffusers read them from.

The new vectors live in their own parameter (`AddedTokenEmbedding.added`), beside the frozen original table, so
training them cannot touch any other row: the rest of the table stays bit-identical by construction (kohya instead
updates the whole table and copies the old rows back after every step).

Files: `.safetensors` with `emb_params` [n, dim] (kohya, WebUI, ComfyUI, diffusers), and the WebUI `.pt` layout
(`string_to_param["*"]`, `string_to_token`, `name`, `step`), also written for `--save_model_as ckpt` as kohya does.
Models with several text encoders (SDXL) read and write one tensor per encoder, keyed by the family's
`TextEncoderSlot.embedding_key` (`clip_l`, `clip_g`): one word has vectors in every encoder. `add_word` /
`TrainedWord` is that word, the one implementation textual inversion and pivotal tuning (`PivotalEmbedding`, a word
trained beside a LoRA or a full model) share; a LoRA can carry it inside (`bundle_tensors`, WebUI's `bundle_emb.*`).
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


@dataclass(frozen=True)
class WordFlags:
    """The command-line flags a trained word's settings come from, so that errors name the flag the user gave:
    textual inversion's by default, pivotal tuning's in LoRA and full-model training (PIVOTAL_FLAGS)."""

    token: str = "--token_string"
    num_vectors: str = "--num_vectors_per_token"
    init_word: str = "--init_word"
    weights: str = "--weights"


PIVOTAL_FLAGS = WordFlags(token="--pivotal_token", num_vectors="--pivotal_num_vectors",
                          init_word="--pivotal_init_word", weights="")  # pivotal tuning starts no word from a file


def add_tokens(tokenizer, token_string: str, num_vectors: int, *, flags: WordFlags = WordFlags()) -> NewTokens:
    """Register the new tokens with the tokenizer. A token that would reuse an existing id (the string is already a
    vocabulary entry) is an error; a string the tokenizer already reads as one known token is a warning (the new
    token takes that word over in prompts)."""
    if not token_string or any(c.isspace() for c in token_string):
        raise ValueError(f"{flags.token} {token_string!r}: give one word without spaces, e.g. 'mychar'")
    if num_vectors < 1:
        raise ValueError(f"{flags.num_vectors} {num_vectors}: must be at least 1")
    known = tokenizer(token_string, add_special_tokens=False).input_ids
    if len(known) == 1:
        logger.warning("%s %r is already a known CLIP token (id %d); the new embedding replaces its meaning "
                       "wherever it appears in prompts. A made-up word avoids that.", flags.token, token_string,
                       known[0])
    names = token_names(token_string, num_vectors)
    before = len(tokenizer)
    tokenizer.add_tokens(list(names))
    ids = tuple(tokenizer.convert_tokens_to_ids(list(names)))
    collisions = [name for name, i in zip(names, ids) if i < before]
    if collisions:
        raise ValueError(f"{flags.token} {token_string!r}: {', '.join(collisions)} already exist(s) in the "
                         "tokenizer's vocabulary, so no new embedding could be added for it; choose another token "
                         "string")
    return NewTokens(token_string, names, ids)


def init_vectors(tokenizer, embedding: nn.Embedding, init_word: str | None, num_vectors: int, *,
                 flags: WordFlags = WordFlags()) -> torch.Tensor:
    """Starting vectors [num_vectors, dim]: the init word's token embeddings, repeated to fill (kohya); without an
    init word, the mean of the table (a neutral start)."""
    weight = embedding.weight.detach()
    if not init_word:
        return weight.float().mean(0, keepdim=True).repeat(num_vectors, 1)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(ids) > num_vectors:
        raise ValueError(f"{flags.init_word} {init_word!r} is {len(ids)} tokens, more than {flags.num_vectors} "
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

    @property
    def num_embeddings(self) -> int:  # so that layers stack: loaded embeddings, then the ones being trained
        return self.num_original + len(self.added)

    @property
    def embedding_dim(self) -> int:
        return self.added.shape[-1]

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
    """Give the text encoder the new rows, after the rows it has (which may themselves be added ones)."""
    embeddings = text_encoder.embeddings if hasattr(text_encoder, "embeddings") else text_encoder.text_model.embeddings
    original = embeddings.token_embedding
    # The vectors keep their dtype (fp32 when trained, even when the frozen table is half precision); lookups
    # cast them to the table's dtype.
    added = AddedTokenEmbedding(original, vectors)
    embeddings.token_embedding = added
    return added


@contextlib.contextmanager
def original_token_embedding(text_encoders: list) -> Iterator[None]:
    """Within the block the text encoders have their original token tables (no added rows), e.g. to save them as a
    standard checkpoint, which has no place for new tokens; the added layers come back afterwards."""
    tables = [te.embeddings if hasattr(te, "embeddings") else te.text_model.embeddings for te in text_encoders]
    added = [embeddings.token_embedding for embeddings in tables]
    for embeddings, layer in zip(tables, added):
        while isinstance(layer, AddedTokenEmbedding):
            layer = layer.original
        embeddings.token_embedding = layer
    try:
        yield
    finally:
        for embeddings, layer in zip(tables, added):
            embeddings.token_embedding = layer


# ----------------------------------------------------------------------------------------------------------
# A word in every text encoder


def _state_key(key: str, index: int) -> str:
    # The first encoder's vectors keep the plain key, the one states of one-encoder models (SD 1.x / 2.x) have always
    # used, so those stay readable; further encoders (SDXL's bigG) add "_2", ...
    return key if index == 0 else f"{key}_{index + 1}"


@dataclass(frozen=True)
class TrainedWord:
    """A new word in every text encoder of a model (family order): the same token strings in each tokenizer, and in
    each encoder the layer that holds the word's trained vectors, of that encoder's width (SDXL: CLIP ViT-L's and
    OpenCLIP bigG's). Textual inversion trains only this; pivotal tuning trains it beside a LoRA or a full model."""

    tokens: NewTokens  # as the first tokenizer has them (every tokenizer gets the same token strings)
    layers: tuple[AddedTokenEmbedding, ...]
    keys: tuple[str, ...]  # each encoder's key in a file with one tensor per encoder (clip_l, clip_g)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [layer.added for layer in self.layers]

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """Each encoder's vectors [n, width] under its embedding key, in family order."""
        return {key: layer.added.detach() for key, layer in zip(self.keys, self.layers)}

    def state_keys(self, key: str) -> list[str]:
        return [_state_key(key, i) for i in range(len(self.layers))]

    def state(self, key: str) -> dict[str, torch.Tensor]:
        """The vectors for a training state: the first encoder's under `key`, the others' under `<key>_2`, ..."""
        return {name: layer.added.detach().clone() for name, layer in zip(self.state_keys(key), self.layers)}

    def load_state(self, state: dict[str, torch.Tensor], key: str) -> None:
        missing = [name for name in self.state_keys(key) if name not in state]
        if missing:
            raise ValueError(f"the training state holds no vectors of {self.tokens.token_string!r} for "
                             f"{len(missing)} of the model's {len(self.layers)} text encoders ({', '.join(missing)} "
                             "missing): it was saved by a run that trained the word in fewer encoders; start a new "
                             "run instead of resuming")
        with torch.no_grad():
            for name, parameter in zip(self.state_keys(key), self.parameters):
                parameter.copy_(state[name])


def add_word(models, *, token_string: str, num_vectors: int, init_word: str | None, dtype: torch.dtype,
             weights: Path | None = None, flags: WordFlags = WordFlags()) -> TrainedWord:
    """The word's tokens in every tokenizer and its starting vectors in every text encoder of `models` (`SDModels`):
    from `weights` (an embedding file for this family), else `init_word` looked up in that encoder's own table, else
    the table's mean; installed after the rows each encoder has, trainable. Raises ValueError (EmbeddingFileError
    too) naming the flag (`flags`) that needs changing."""
    slots, encoders = models.family.text_encoders, models.text_encoders
    tables = [encoder.get_input_embeddings() for encoder in encoders]
    tokens = [add_tokens(tokenizer, token_string, num_vectors, flags=flags) for tokenizer in models.tokenizers]
    if weights:
        vectors = load_encoder_embeddings(Path(weights), [(slot.embedding_key, table.embedding_dim)
                                                          for slot, table in zip(slots, tables)],
                                          models.family.description)
        if len(vectors[0]) != num_vectors:
            raise ValueError(f"{flags.weights} {weights} holds {len(vectors[0])} vector(s); give "
                             f"{flags.num_vectors} {len(vectors[0])}")
    else:
        vectors = [init_vectors(tokenizer, table, init_word, num_vectors, flags=flags)
                   for tokenizer, table in zip(models.tokenizers, tables)]
    layers = tuple(install(encoder, v.to(dtype)) for encoder, v in zip(encoders, vectors))
    for layer in layers:
        layer.added.requires_grad_(True)
    return TrainedWord(tokens[0], layers, tuple(slot.embedding_key for slot in slots))


# ----------------------------------------------------------------------------------------------------------
# Files


def save_embedding(path: Path, vectors: torch.Tensor, *, token_string: str, step: int,
                   metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """`.safetensors` (emb_params + metadata) or the WebUI `.pt` layout (`.pt` / `.ckpt`), atomically."""
    from library.atomic_files import atomic_file

    vectors = vectors.detach().to("cpu", dtype or vectors.dtype).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from library.safetensors_io import save_tensors

        save_tensors(path, {"emb_params": vectors}, dict(metadata or {}))
        return path
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token_string, "step": step,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    with atomic_file(path) as tmp:
        torch.save(data, tmp)
    return path


def save_encoder_embeddings(path: Path, vectors: list[torch.Tensor], keys: list[str], *, token_string: str,
                            step: int, metadata: dict[str, str] | None = None,
                            dtype: torch.dtype | None = None) -> Path:
    """One word's vectors for each text encoder, `keys` the family's `TextEncoderSlot.embedding_key`s in the same
    order; the inverse of `load_encoder_embeddings`. One encoder: `save_embedding`'s layouts. Several (SDXL): one
    tensor per encoder under its key (`clip_l` [n, 768], `clip_g` [n, 1280]), as `.safetensors` with metadata or as
    the same dict in a torch file (`.pt` / `.ckpt`, kohya's sdxl_train_textual_inversion.py): the layout WebUI and
    ComfyUI read; diffusers' `load_textual_inversion` takes each tensor with its encoder and tokenizer."""
    from library.atomic_files import atomic_file

    if len(vectors) != len(keys):
        raise ValueError(f"{len(vectors)} tensors for {len(keys)} text encoders ({', '.join(keys)})")
    if len(vectors) == 1:
        return save_embedding(path, vectors[0], token_string=token_string, step=step, metadata=metadata, dtype=dtype)
    tensors = {key: v.detach().to("cpu", dtype or v.dtype).contiguous() for key, v in zip(keys, vectors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from library.safetensors_io import save_tensors

        save_tensors(path, tensors, dict(metadata or {}))
        return path
    with atomic_file(path) as tmp:
        torch.save(tensors, tmp)
    return path


def _read_embedding_file(path: Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: no such embedding file")
    try:
        if path.suffix == ".safetensors":
            from library.safetensors_io import SafetensorsReader

            with SafetensorsReader(path) as reader:
                return {k: reader.read(k) for k in reader.keys()}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise EmbeddingFileError(f"{path}: cannot be read as an embedding ({e})") from None


def _per_encoder_keys(data: object) -> list[str]:
    """The `clip_*` keys of a file that holds one tensor per text encoder (SDXL: clip_l, clip_g)."""
    return sorted(k for k in data if isinstance(k, str) and k.startswith("clip_")) if isinstance(data, dict) else []


def _checked(path: Path, vectors: object, dim: int, what: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingFileError(f"{path}: the embedding holds no tensor{what}")
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() != 2 else vectors
    if vectors.shape[-1] != dim:
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(vectors.shape[-1], "another model")
        raise EmbeddingFileError(f"{path}: vectors{what} of width {vectors.shape[-1]} (an embedding for {family}), "
                                 f"but this model's text encoder is {dim} wide; use an embedding made for this model "
                                 "family")
    return vectors.float()


def load_embedding(path: Path, *, dim: int, key: str = "clip_l") -> torch.Tensor:
    """The vectors [n, dim] of an embedding file for a model with one text encoder (kohya / WebUI `.safetensors`
    `emb_params`, WebUI `.pt` `string_to_param`, a diffusers `{token: tensor}` file, or a file keyed by the encoder
    as ComfyUI reads it, e.g. `clip_l`), checked against the text encoder's width. A file with vectors for several
    encoders (an SDXL embedding) is refused: taking one of its parts would silently change what it means."""
    path = Path(path)
    data = _read_embedding_file(path)
    several = _per_encoder_keys(data)
    if len(several) > 1:
        raise EmbeddingFileError(f"{path}: an embedding for a model with several text encoders ({', '.join(several)}"
                                 f": SDXL), but this model has one text encoder; use an embedding made for it")
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else None
    elif isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and key in data:
        vectors = data[key]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))  # diffusers' {token: tensor}
    else:
        keys = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
        raise EmbeddingFileError(f"{path}: not an embedding file (expected emb_params or string_to_param; found "
                                 f"{keys})")
    return _checked(path, vectors, dim, "")


def load_encoder_embeddings(path: Path, encoders: list[tuple[str, int]], model: str) -> list[torch.Tensor]:
    """The vectors of an embedding file for each text encoder, given as (embedding key, width) in the family's
    order. One encoder: any single-encoder layout (`load_embedding`). Several (SDXL): one tensor per encoder under
    its key (`clip_l` [n, 768], `clip_g` [n, 1280], the layout WebUI, ComfyUI and kohya's SDXL trainer use), with the
    same number of vectors in each."""
    path = Path(path)
    if len(encoders) == 1:
        (key, dim), = encoders
        return [load_embedding(path, dim=dim, key=key)]
    data = _read_embedding_file(path)
    wanted = [key for key, _ in encoders]
    found = _per_encoder_keys(data)
    if not isinstance(data, dict) or any(key not in data for key in wanted) or set(found) - set(wanted):
        has = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
        raise EmbeddingFileError(f"{path}: {model} needs an embedding with one tensor per text encoder "
                                 f"({', '.join(wanted)}); this file has {has or 'nothing'}"
                                 f"{' (an embedding for a one-encoder model such as SD 1.x / 2.x)' if not found else ''}"
                                 "; use an embedding made for this model family")
    vectors = [_checked(path, data[key], dim, f" under {key}") for key, dim in encoders]
    if len({len(v) for v in vectors}) > 1:
        counts = ", ".join(f"{key}: {len(v)}" for (key, _), v in zip(encoders, vectors))
        raise EmbeddingFileError(f"{path}: its encoders have different numbers of vectors ({counts}); a word needs "
                                 "the same number in each")
    return vectors


def template_caption(templates: tuple[str, ...], new_tokens: NewTokens, rng: random.Random) -> str:
    return rng.choice(templates).format(new_tokens.prompt_text)


# ----------------------------------------------------------------------------------------------------------
# Embeddings in other trainers: loaded ones (frozen) and pivotal tuning (a token trained in the same run)


BUNDLE_PREFIX = "bundle_emb."  # textual-inversion embeddings carried in a LoRA file (WebUI, ComfyUI)


def split_bundled(tensors: dict) -> tuple[dict, dict]:
    """A LoRA file's tensors as (network weights, bundled embedding tensors `bundle_emb.*`): what reads a LoRA as a
    network keeps the first and decides what to do with the second (carry it, use it, or say it is left out)."""
    bundled = {k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)}
    return {k: v for k, v in tensors.items() if k not in bundled}, bundled


def bundled_words(keys) -> list[str]:
    """The prompt words of a LoRA file's bundled embeddings (`bundle_emb.<word>.*`), sorted."""
    return sorted({k[len(BUNDLE_PREFIX):].split(".", 1)[0] for k in keys if k.startswith(BUNDLE_PREFIX)})


def bundle_tensors(word: TrainedWord) -> dict[str, torch.Tensor]:
    """The word as tensors to carry inside a LoRA file, under the keys WebUI's Lora extension and ComfyUI read.

    The layout is AUTOMATIC1111's lora-embedding bundle (stable-diffusion-webui PR #13568, KohakuBlueleaf): a key
    `bundle_emb.<word>.<key in the embedding's own state dict>`. Its extensions-builtin/Lora/networks.py
    `load_network` splits each `bundle_emb.*` key into the word and the rest, turns `string_to_param.<k>` into
    `{"string_to_param": {k: tensor}}` and any other rest into a dict entry of that name, and hands the dict to
    modules/textual_inversion `create_embedding_from_data`, which reads `string_to_param` as a one-encoder embedding
    and a dict with both `clip_l` and `clip_g` as an SDXL one. ComfyUI's comfy/sd1_clip.py `load_embed` looks for
    `bundle_emb.*.string_to_param.*`, then `bundle_emb.*.<its encoder's embedding key>` (clip_l, clip_g). So: one
    text encoder (SD 1.x / 2.x) `bundle_emb.<word>.string_to_param.*`; several (SDXL) one tensor per encoder,
    `bundle_emb.<word>.clip_l` and `bundle_emb.<word>.clip_g` (what OneTrainer writes for SDXL too)."""
    token = word.tokens.token_string
    vectors = word.vectors
    if len(vectors) == 1:
        return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": next(iter(vectors.values())).float()}
    return {f"{BUNDLE_PREFIX}{token}.{key}": v.float() for key, v in vectors.items()}


def load_embeddings(models, files: list[str]) -> list[NewTokens]:
    """Add each embedding file as a frozen word named after the file's stem (WebUI's rule), in every text encoder
    of the model (`SDModels`: SDXL's two get their own vectors), all words of one encoder in one layer. Returns the
    words as the first tokenizer has them (every tokenizer gets the same token strings)."""
    slots = models.family.text_encoders
    encoders = [(slot.embedding_key, encoder.get_input_embeddings().embedding_dim)
                for slot, encoder in zip(slots, models.text_encoders)]
    words: list[NewTokens] = []
    per_encoder: list[list[torch.Tensor]] = [[] for _ in slots]
    for file in files:
        path = Path(file)
        vectors = load_encoder_embeddings(path, encoders, models.family.description)
        added = [add_tokens(tokenizer, path.stem, len(v)) for tokenizer, v in zip(models.tokenizers, vectors)]
        words.append(added[0])
        for i, v in enumerate(vectors):
            per_encoder[i].append(v)
    for encoder, vectors in zip(models.text_encoders, per_encoder):
        if vectors:
            install(encoder, torch.cat(vectors)).added.requires_grad_(False)
    if words:
        logger.info("embeddings: %s", ", ".join(f"{t.token_string} ({len(t.ids)} vectors)" for t in words))
    return words


class PivotalEmbedding:
    """A word trained in the same run as a LoRA or a full model (pivotal tuning), in every text encoder of the model
    (`TrainedWord`): trained for the first `train_steps` steps (None: all), then frozen in every encoder, and saved
    with the model."""

    def __init__(self, word: TrainedWord, *, train_steps: int | None):
        self.word, self.train_steps = word, train_steps
        self.training = True

    @property
    def new_tokens(self) -> NewTokens:
        return self.word.tokens

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The vectors of every encoder: the optimizer group at --pivotal_lr."""
        return self.word.parameters

    @property
    def layers(self) -> tuple[AddedTokenEmbedding, ...]:
        return self.word.layers

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """Each encoder's vectors under the family's embedding key (clip_l; SDXL clip_l and clip_g)."""
        return self.word.vectors

    def before_step(self, global_step: int) -> None:
        if self.training and self.train_steps is not None and global_step >= self.train_steps:
            logger.info("step %d: the embedding of %r is frozen from here on (--pivotal_steps)", global_step + 1,
                        self.new_tokens.token_string)
            for parameter in self.parameters:
                parameter.requires_grad_(False)
            self.training = False


def add_pivotal_token(models, *, token_string: str, init_word: str | None, num_vectors: int,
                      train_steps: int | None, dtype: torch.dtype = torch.float32) -> PivotalEmbedding:
    """--pivotal_token: the word in every text encoder of `models`, trainable."""
    word = add_word(models, token_string=token_string, num_vectors=num_vectors, init_word=init_word, dtype=dtype,
                    flags=PIVOTAL_FLAGS)
    return PivotalEmbedding(word, train_steps=train_steps)


def check_token_in_captions(records, token_string: str, *, flag: str, alternatives: str = "") -> None:
    """Raise ValueError unless some caption contains `token_string` (with its subset's --caption_prefix /
    --caption_suffix, before per-sample shuffling and dropout). A word in no caption never reaches the text
    encoder, so its vectors would train nothing while the run looks normal. `records`: the dataset's
    ImageRecords; `alternatives`: other ways this trainer has to use the word, for the message."""
    for record in records:
        options = record.subset.caption
        if token_string in " ".join(p for p in (options.caption_prefix, record.caption, options.caption_suffix) if p):
            return
    raise ValueError(f"{flag} {token_string!r}: no caption contains it, so it would never be trained. Put it in the "
                     "captions, in the folder name ('<repeats>_<token> <class>', used for images without a caption "
                     f"file) or in --caption_prefix{alternatives}")


def embeddings_dir(path_stem: Path) -> Path:
    """Where a saved model's trained words go: `<model name>_embeddings/<token>.safetensors`, beside the model."""
    return path_stem.with_name(path_stem.name + "_embeddings")


def save_beside(path_stem: Path, pivot: PivotalEmbedding, *, step: int, metadata: dict[str, str]) -> Path:
    """The trained word as an embedding file named after the token (WebUI's embeddings/ and ComfyUI's
    models/embeddings/ take the file name as the prompt word; diffusers' load_textual_inversion reads it): `emb_params`
    for a one-encoder model, `clip_l` and `clip_g` for SDXL (`save_encoder_embeddings`)."""
    token = pivot.new_tokens.token_string
    vectors = pivot.vectors
    path = save_encoder_embeddings(embeddings_dir(path_stem) / f"{token}.safetensors", list(vectors.values()),
                                   list(vectors), token_string=token, step=step, metadata=metadata)
    logger.info("saved %s", path)
    return path


def expand_tokens(text: str, tokens: list[NewTokens]) -> str:
    for t in tokens:
        text = t.expand(text)
    return text


class CaptionRewrite:
    """A dataset's caption rewrite for added tokens: each token string expanded to all its vectors, or (textual
    inversion with templates) a template picked with the sample's own random stream."""

    def __init__(self, tokens: list[NewTokens], templates: tuple[str, ...] | None = None):
        self.tokens, self.templates = tokens, templates

    def __call__(self, caption: str, rng: random.Random) -> str:
        if self.templates:
            return template_caption(self.templates, self.tokens[0], rng)
        return expand_tokens(caption, self.tokens)
