"""Text-encoder outputs computed once before training (`--cache_text_encoder_outputs`,
`--cache_text_encoder_outputs_to_disk`): kohya's way to train an SDXL LoRA without its two text encoders in memory.

What is cached is the text part of the conditioning (`TextConditioner.encode_text`: hidden states, and the pooled
output where the family has one), one entry per distinct caption, computed under the same autocast as the training
step. Each batch then meets its images' size/crop conditioning (`TextConditioner.with_sizes`) as without a cache,
so the training loop cannot tell the difference (`CachedTextConditioner` has the conditioner's call).

Only captions that are the same at every step can be cached: options that change them per step (shuffle, dropout,
tag dropout, token warmup, wildcards) are refused by name, and a caption that is not in the cache at training time
is an error, never encoded silently with encoders that may be gone.

On disk each image gets `<stem>_te_outputs.safetensors` beside it (kohya: `<stem>_te_outputs.npz`), its key in the
metadata: the caption text, a digest of each text encoder's weights, the encoding settings (token length, clip skip,
weighted captions), the family and the dtype. An entry whose key differs (edited caption, other model, other
settings) is recomputed and rewritten, never reused. With several processes each encodes its share of the captions
and all then hold the whole cache (library/cache_split.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from library.cache_split import SINGLE_PROCESS, ProcessShare
from library.captions import per_step_caption_options
from library.safetensors_io import SafetensorsFormatError, SafetensorsReader, save_tensors
from library.text_conditioning import SizeConditioning, TextConditioner, TextConditioning
from library.train_dataset import Item, TrainingDataset, tensor_fingerprint

logger = logging.getLogger(__name__)

DISK_SUFFIX = "_te_outputs.safetensors"
ENCODE_BATCH = 8  # captions per text-encoder call while caching (memory stays at a few captions' activations)
FLAG = "--cache_text_encoder_outputs"


def check_captions_are_fixed(dataset: TrainingDataset) -> None:
    """Refuse, by flag and subset, caption options that change a caption from step to step."""
    problems = {}
    for item in dataset.items:
        subset = item.record.subset
        flags = per_step_caption_options(subset.caption, dataset.max_train_steps)
        if flags:
            problems.setdefault(str(subset.image_dir), flags)
    if problems:
        listing = "; ".join(f"{', '.join(flags)} ({folder})" for folder, flags in problems.items())
        raise ValueError(f"{FLAG} caches one output per caption, so captions must not change between steps, but "
                         f"these options change them: {listing}. Turn them off, or train without {FLAG}")


class TextEncoderOutputCache:
    def __init__(self, conditioner: TextConditioner, *, to_disk: bool = False,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 batch_size: int = ENCODE_BATCH):
        if batch_size < 1:
            raise ValueError(f"--text_encoder_batch_size must be at least 1, got {batch_size}")
        self.conditioner = conditioner
        self.to_disk = to_disk
        self.batch_size = batch_size  # captions per text-encoder call (the entries do not depend on it)
        self.autocast = autocast  # the training step's autocast, so cached outputs equal uncached ones
        self.entries: dict[str, dict[str, torch.Tensor]] = {}  # caption -> {"hidden_states", ["pooled"]}
        self._settings_key: dict | None = None
        self.encoded = 0  # captions this process encoded in its last build (the others read or received)

    def settings_key(self) -> dict:
        """Everything but the caption that determines an entry (the encoder digests are computed once)."""
        if self._settings_key is None:
            c = self.conditioner
            self._settings_key = {"conditioner": type(c).__name__, "encoding": asdict(c.encoding),
                                  "encoders": [tensor_fingerprint(te) for te in c.text_encoders],
                                  "dtype": str(next(c.text_encoders[0].parameters()).dtype), "version": 1}
        return self._settings_key

    def key(self, caption: str) -> dict:
        return {"caption": caption, **self.settings_key()}

    def build(self, dataset: TrainingDataset, share: ProcessShare = SINGLE_PROCESS) -> None:
        """Encode every distinct caption of the dataset (reading valid disk entries instead, with to_disk). With
        several processes (`share`) each encodes its share of the caption chunks and every process then holds every
        entry (cache_split.py)."""
        check_captions_are_fixed(dataset)
        first_items: dict[str, Item] = {}  # image file -> an item showing it (repeats share the caption)
        for item in dataset.items:
            first_items.setdefault(str(item.record.path), item)
        by_image = {Path(path): dataset.fixed_caption(item) for path, item in first_items.items()}
        to_write, stale, reused = [], 0, 0  # images whose disk entry is missing or stale
        for image, caption in by_image.items():
            loaded = self._load_disk(image, caption) if self.to_disk else None
            if isinstance(loaded, dict):
                self.entries.setdefault(caption, loaded)
                reused += 1
            else:
                stale += loaded == "stale"
                to_write.append(image)
        if stale:
            logger.info("text-encoder cache: %d entries were stale (caption, model or settings changed) and are "
                        "recomputed", stale)
        if reused:
            logger.info("text-encoder cache: reused %d entries from disk", reused)
        # The same lists on every process (see cache_split.py), in dataset order.
        captions = list(dict.fromkeys(by_image.values()))
        to_encode = share.agreed([c for c in captions if c not in self.entries], captions)
        to_write = share.agreed(to_write, list(by_image))
        chunks = [to_encode[start:start + self.batch_size] for start in range(0, len(to_encode), self.batch_size)]
        mine = share.mine(chunks)
        my_captions, encoded_by_someone = {c for chunk in mine for c in chunk}, set(to_encode)
        # An image's file is written by the process that encoded its caption; one whose caption was read from
        # another image's valid file, by position.
        my_images = [image for i, image in enumerate(to_write) if by_image[image] in my_captions
                     or (by_image[image] not in encoded_by_someone and share.owns(i))]
        share.run_together(lambda: self._compute_and_write(mine, my_images, by_image))
        self.encoded = len(my_captions)
        if share.count > 1:
            logger.info("text-encoder cache: this process encoded %d of the %d captions to encode (%d processes)",
                        self.encoded, len(to_encode), share.count)
            if self.to_disk:
                share.barrier()  # every process has written its entries
                self._read_others(share.others(chunks), to_write, by_image, share)
            else:
                for entries in share.exchange_rounds(mine, self._entries_of):
                    self.entries.update(entries)

    def _compute_and_write(self, chunks: list[list[str]], images: list[Path], by_image: dict[Path, str]) -> None:
        self._compute(chunks)
        if self.to_disk:
            for image in images:
                self._save_disk(image, by_image[image])

    def _compute(self, chunks: list[list[str]]) -> None:
        """Encode each chunk of captions in one text-encoder call."""
        total = sum(len(chunk) for chunk in chunks)
        with torch.no_grad(), self.autocast(), tqdm(total=total, desc="caching text encoder outputs",
                                                   unit="caption", disable=not total) as bar:
            for chunk in chunks:
                text = self.conditioner.encode_text(chunk)
                for i, caption in enumerate(chunk):
                    entry = {"hidden_states": text.hidden_states[i].cpu()}
                    if text.pooled is not None:
                        entry["pooled"] = text.pooled[i].cpu()
                    self.entries[caption] = entry
                bar.update(len(chunk))

    def _entries_of(self, chunk: list[str]) -> dict:
        """A computed chunk's entries by caption, for another process to store (cloned: each is a view of its
        chunk's output, and pickling a view sends the whole chunk)."""
        return {caption: {name: t.clone() for name, t in self.entries[caption].items()} for caption in chunk}

    def _read_others(self, chunks: list[list[str]], to_write: list[Path], by_image: dict[Path, str],
                     share: ProcessShare) -> None:
        """The captions the other processes encoded, read (with the usual key check) from the first file each wrote
        for it. One that this process cannot read stops every process (see LatentCache._read_others)."""
        first_image = {}
        for image in to_write:
            first_image.setdefault(by_image[image], image)
        unreadable = []
        for chunk in chunks:
            for caption in chunk:
                loaded = self._load_disk(first_image[caption], caption)
                if isinstance(loaded, dict):
                    self.entries[caption] = loaded
                else:
                    unreadable.append(str(self.disk_path(first_image[caption])))
        unreadable = sorted(set().union(*share.gather(set(unreadable))))
        if unreadable:
            more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
            raise ValueError(f"{unreadable[0]}{more}: another process wrote this text-encoder cache entry, but not "
                             "every process can read it back. With --cache_text_encoder_outputs_to_disk the "
                             "processes share their entries through the dataset folder: put the dataset on storage "
                             "every machine shares, or fill each copy's cache before training "
                             "(tools/cache_text_encoder_outputs.py, one process per machine), or cache in memory "
                             f"({FLAG} without --cache_text_encoder_outputs_to_disk)")

    def conditioner_for_training(self, device: torch.device | str) -> "CachedTextConditioner":
        return CachedTextConditioner(self.conditioner, self.entries, device)

    # Disk -------------------------------------------------------------------------------------------------

    @staticmethod
    def disk_path(image: Path) -> Path:
        return image.with_name(image.stem + DISK_SUFFIX)

    def _load_disk(self, image: Path, caption: str):
        path = self.disk_path(image)
        if not path.exists():
            return None
        try:
            with SafetensorsReader(path) as reader:
                if json.loads(reader.metadata.get("cache_key", "null")) != self.key(caption):
                    return "stale"
                return {name: reader.read(name) for name in reader.keys()}
        except (SafetensorsFormatError, json.JSONDecodeError):
            return "stale"

    def _save_disk(self, image: Path, caption: str) -> None:
        path = self.disk_path(image)
        try:
            save_tensors(path, {k: v.contiguous() for k, v in self.entries[caption].items()},
                         {"cache_key": json.dumps(self.key(caption))})
        except OSError as e:
            raise OSError(f"{path}: cannot write the text-encoder cache next to the image ({e}); make the folder "
                          f"writable or use {FLAG} without --cache_text_encoder_outputs_to_disk") from e


class CachedTextConditioner:
    """A family's conditioner answering from cached text-encoder outputs: the same call, the same result."""

    skips_last_layer = False  # no text encoder runs (or trains) in a step

    def __init__(self, conditioner: TextConditioner, entries: dict[str, dict[str, torch.Tensor]],
                 device: torch.device | str):
        self.conditioner, self.entries, self.device = conditioner, entries, device

    def __call__(self, captions: list[str], sizes: list[SizeConditioning] | None = None) -> TextConditioning:
        missing = [c for c in captions if c not in self.entries]
        if missing:
            raise ValueError(f"{FLAG}: the caption {missing[0]!r} is not in the text-encoder cache (its captions "
                             "were fixed before training); this is a bug, please report it with your flags")
        rows = [self.entries[c] for c in captions]
        hidden = torch.stack([r["hidden_states"] for r in rows]).to(self.device)
        pooled = torch.stack([r["pooled"] for r in rows]).to(self.device) if "pooled" in rows[0] else None
        return self.conditioner.with_sizes(TextConditioning(hidden, pooled), sizes)


def release_text_encoders(text_encoders: list[torch.nn.Module]) -> None:
    """Free the encoders' weights once their outputs are cached and nothing else needs them: the modules stay (a
    LoRA network keeps references for its names) but their tensors move to the meta device, and calling one is an
    error (a meta tensor would otherwise flow on as shapes without numbers)."""

    def refuse(module, args):
        raise RuntimeError(f"{type(module).__name__} was released after {FLAG} cached its outputs and cannot run; "
                           "this is a bug, please report it with your flags")

    for text_encoder in text_encoders:
        text_encoder.to("meta")
        text_encoder.register_forward_pre_hook(refuse)
