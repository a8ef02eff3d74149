"""VAE latents computed once before training (`--cache_latents`, `--cache_latents_to_disk`).

An entry is keyed by everything that determines it: the image file (size + mtime), its crop plan (resize, crop,
bucket), the flip, the VAE's weights (a digest) and the dtype. On disk each image gets
`<stem>_<W>x<H>_sd_latents.safetensors` (W x H: the bucket) beside it holding the key in its metadata; an entry
whose key differs (edited image, other resolution or bucket settings, other VAE, other dtype) is recomputed and
rewritten, never reused.
`--skip_cache_check` skips only the image-file part of the check (for datasets on slow storage) and says so.

Latents are stored unscaled (the VAE's sample); the training step multiplies by the family's scale factor.
The sample is drawn with a generator seeded from the pixels, so a cache rebuilt from the same inputs is identical.
With several processes each encodes its share and all then hold the whole cache (library/cache_split.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.cache_split import SINGLE_PROCESS, ProcessShare
from library.safetensors_io import SafetensorsFormatError, SafetensorsReader, save_tensors
from library.train_dataset import Item, TrainingDataset, file_fingerprint, tensor_fingerprint

logger = logging.getLogger(__name__)

DISK_SUFFIX = "_sd_latents.safetensors"


@dataclass(frozen=True)
class CacheSettings:
    to_disk: bool = False
    batch_size: int = 1  # --vae_batch_size
    skip_cache_check: bool = False
    # Processes that read and resize the images while the VAE encodes (0: this process). The entries do not
    # depend on it: images come back in order, and each latent's noise is seeded from its own pixels.
    image_workers: int = 0


class _PixelsOf(torch.utils.data.Dataset):
    """The pixels (and alpha mask) of the items to encode, by position: what image workers compute."""

    def __init__(self, dataset: TrainingDataset, items: list[Item]):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.dataset.load_pixels(self.items[index], None, flip=False)


def _as_list(batch: list) -> list:
    return batch


class LatentCache:
    def __init__(self, vae: torch.nn.Module, settings: CacheSettings, *, dtype: torch.dtype = torch.float32):
        self.vae = vae
        self.settings = settings
        self.dtype = dtype
        self.vae_id = tensor_fingerprint(vae)
        self._latents: dict[tuple[tuple[str, int], bool], torch.Tensor] = {}
        self._masks: dict[tuple[tuple[str, int], bool], torch.Tensor] = {}
        self.encoded = 0  # entries this process encoded in its last build (the others read or received)

    def key(self, dataset: TrainingDataset, item: Item) -> dict:
        plan = dataset.plan(item, None)
        key = {"plan": [list(plan.resized_size), plan.crop_left, plan.crop_top, list(plan.bucket)],
               "vae": self.vae_id, "dtype": str(self.dtype), "version": 1}
        if item.record.subset.resize_interpolation:  # other pixels (absent = the default filter: older keys hold)
            key["resize_interpolation"] = item.record.subset.resize_interpolation.lower()
        if not self.settings.skip_cache_check:
            key["file"] = file_fingerprint(item.record.path)
            if dataset.mask_source(item) is not None:  # the loss mask is cached too
                key["mask_file"] = file_fingerprint(dataset.mask_source(item))
        return key

    def build(self, dataset: TrainingDataset, share: ProcessShare = SINGLE_PROCESS) -> None:
        """Fill the cache for every image of the dataset (and its flip when flip_aug is on). With several processes
        (`share`) each encodes its share of the batches and every process then holds every entry (cache_split.py)."""
        for item in dataset.items:
            if item.record.subset.random_crop or item.record.subset.color_aug:
                raise ValueError(f"{item.record.subset.image_dir}: --cache_latents cannot be used with random_crop "
                                 "or color_aug (each epoch needs new pixels); turn one of them off")
        unique = {item.cache_id: item for item in dataset.items}
        keys = {cache_id: self.key(dataset, item) for cache_id, item in unique.items()}
        todo, reused, stale = [], 0, 0
        for cache_id, item in unique.items():
            key = keys[cache_id]
            wants_mask = dataset.wants_mask(item)
            loaded = self._load_disk(item, key, wants_mask=wants_mask) if self.settings.to_disk else None
            if loaded == "stale":
                stale += 1
            if isinstance(loaded, dict):
                reused += 1
                self._store(item, loaded)
            else:
                todo.append(cache_id)
        if stale:
            logger.info("latent cache: %d entries were stale (image, resolution, VAE or dtype changed) and are "
                        "recomputed", stale)
        if self.settings.skip_cache_check and reused:
            logger.warning("--skip_cache_check: reused %d cached latents without checking the image files", reused)
        if self.settings.to_disk:
            logger.info("latent cache: %d of %d entries read from disk, %d to encode", reused, len(unique), len(todo))
        todo = share.agreed(todo, list(unique))  # the same list on every process (see cache_split.py)
        batches = self._batches([(unique[cache_id], keys[cache_id]) for cache_id in todo])
        mine = share.mine(batches)
        share.run_together(lambda: self._compute(dataset, mine))
        self.encoded = sum(len(batch) for batch in mine)
        if share.count > 1:
            logger.info("latent cache: this process encoded %d of the %d entries to encode (%d processes)",
                        self.encoded, len(todo), share.count)
            if self.settings.to_disk:
                share.barrier()  # every process has written its entries
                self._read_others(dataset, share.others(batches), share)
            else:
                for entries in share.exchange_rounds(mine, self._entries_of):
                    for cache_id, entry in entries.items():
                        self._store(unique[cache_id], entry)
        dataset.latent_cache = self

    def _batches(self, todo: list[tuple[Item, dict]]) -> list[list[tuple[Item, dict]]]:
        """Images of the same bucket encoded together, --vae_batch_size at a time."""
        todo = sorted(todo, key=lambda entry: (entry[0].bucket, str(entry[0].record.path)))
        batches, current = [], []
        for entry in todo:
            if current and (current[-1][0].bucket != entry[0].bucket or len(current) == self.settings.batch_size):
                batches.append(current)
                current = []
            current.append(entry)
        if current:
            batches.append(current)
        return batches

    def _compute(self, dataset: TrainingDataset, batches: list[list[tuple[Item, dict]]]) -> None:
        device = next(self.vae.parameters()).device
        ends = list(itertools.accumulate(len(batch) for batch in batches))
        loaded = torch.utils.data.DataLoader(  # the images of each batch, in order, read by the workers if any
            _PixelsOf(dataset, [item for batch in batches for item, _ in batch]), collate_fn=_as_list,
            batch_sampler=[list(range(end - len(batch), end)) for end, batch in zip(ends, batches)],
            num_workers=self.settings.image_workers)
        total = sum(len(batch) for batch in batches)
        with torch.no_grad(), tqdm(total=total, desc="caching latents", unit="image", disable=not total) as bar:
            for batch, images in zip(batches, loaded):
                pixels = [image for image, _ in images]
                masks = [mask for _, mask in images]
                flips = [item.record.subset.flip_aug for item, _ in batch]
                stack = torch.stack(pixels).to(device, self.dtype)
                plain = self._encode(stack, "plain")
                flipped = self._encode(stack.flip(-1), "flipped") if any(flips) else None
                for i, (item, key) in enumerate(batch):
                    entry = {"latents": plain[i]}
                    if flips[i]:
                        entry["latents_flipped"] = flipped[i]
                    if masks[i] is not None:
                        entry["alpha_mask"] = masks[i]
                    self._store(item, entry)
                    if self.settings.to_disk:
                        self._save_disk(item, key, entry)
                bar.update(len(batch))

    def _entries_of(self, batch: list[tuple[Item, dict]]) -> dict:
        """A computed batch's entries by cache id, for another process to store. Cloned: a stored entry is a view
        of its whole VAE batch, and pickling a view sends the batch."""
        entries = {}
        for item, _ in batch:
            cache_id = item.cache_id
            entry = {"latents": self._latents[(cache_id, False)].clone()}
            if (cache_id, True) in self._latents:
                entry["latents_flipped"] = self._latents[(cache_id, True)].clone()
            if (cache_id, False) in self._masks:
                entry["alpha_mask"] = self._masks[(cache_id, False)].clone()
            entries[cache_id] = entry
        return entries

    def _read_others(self, dataset: TrainingDataset, batches: list[list[tuple[Item, dict]]],
                     share: ProcessShare) -> None:
        """The entries the other processes wrote, read from disk with the usual key check. One that this process
        cannot read (a machine with its own copy of the dataset) stops every process: the entries would be missing
        here at training time."""
        unreadable = []
        for batch in batches:
            for item, key in batch:
                loaded = self._load_disk(item, key, wants_mask=dataset.wants_mask(item))
                if isinstance(loaded, dict):
                    self._store(item, loaded)
                else:
                    unreadable.append(str(self.disk_path(item)))
        unreadable = sorted(set().union(*share.gather(set(unreadable))))
        if unreadable:
            more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
            raise ValueError(f"{unreadable[0]}{more}: another process wrote this latent cache entry, but not every "
                             f"process can read it back. With --cache_latents_to_disk "
                             "the processes share their entries through the dataset folder: put the dataset on "
                             "storage every machine shares, or fill each copy's cache before training "
                             "(tools/cache_latents.py, one process per machine), or cache in memory (--cache_latents "
                             "without --cache_latents_to_disk)")

    def _encode(self, pixels: torch.Tensor, variant: str) -> torch.Tensor:
        dist = self.vae.encode(pixels).latent_dist
        # The sample's noise is seeded per image from its pixels: the same image gives the same cached latents
        # wherever the dataset lives and whatever --vae_batch_size is.
        noise = []
        for image in pixels:
            digest = hashlib.sha256(image.float().cpu().numpy().tobytes() + variant.encode()).hexdigest()
            noise.append(torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(digest[:15], 16))))
        sample = dist.mean + dist.std * torch.stack(noise).to(dist.mean)
        if torch.isnan(sample).any():
            raise FloatingPointError("NaN in VAE latents; the VAE overflows in this precision: use --no_half_vae")
        return sample.float().cpu()

    def _store(self, item: Item, entry: dict) -> None:
        key = item.cache_id
        self._latents[(key, False)] = entry["latents"]
        if "latents_flipped" in entry:
            self._latents[(key, True)] = entry["latents_flipped"]
        if "alpha_mask" in entry:
            self._masks[(key, False)] = entry["alpha_mask"]
            self._masks[(key, True)] = entry["alpha_mask"].flip(-1)

    def get(self, item: Item, flip: bool) -> torch.Tensor:
        return self._latents[(item.cache_id, flip)]

    def get_mask(self, item: Item, flip: bool) -> torch.Tensor | None:
        return self._masks.get((item.cache_id, flip))

    # Disk -------------------------------------------------------------------------------------------------

    @staticmethod
    def disk_path(item: Item):
        # The bucket size is part of the name, so datasets at several resolutions keep separate entries.
        path = item.record.path
        return path.with_name(f"{path.stem}_{item.bucket[0]}x{item.bucket[1]}{DISK_SUFFIX}")

    def _load_disk(self, item: Item, key: dict, *, wants_mask: bool):
        path = self.disk_path(item)
        if not path.exists():
            return None
        try:
            with SafetensorsReader(path) as reader:
                if json.loads(reader.metadata.get("cache_key", "null")) != key:
                    return "stale"
                entry = {name: reader.read(name) for name in reader.keys()}
        except (SafetensorsFormatError, json.JSONDecodeError):
            return "stale"
        if item.record.subset.flip_aug and "latents_flipped" not in entry:
            return "stale"
        if wants_mask != ("alpha_mask" in entry):
            return "stale"
        return entry

    def _save_disk(self, item: Item, key: dict, entry: dict) -> None:
        path = self.disk_path(item)
        try:
            save_tensors(path, {k: v.contiguous() for k, v in entry.items()}, {"cache_key": json.dumps(key)})
        except OSError as e:
            raise OSError(f"{path}: cannot write the latent cache next to the image ({e}); make the folder "
                          "writable or use --cache_latents without --cache_latents_to_disk") from e
