"""Build the bundle of meta-model facts that ships with the code (`library/model_configs/meta_facts.json.gz`, read by
`meta_model_cache.cached`): the tensor shapes and completed configs that reading, converting and writing every
released family at full size asks for, so that a user's first conversion need not import diffusers' model classes
and build the models on the meta device (~20 s for SDXL on a 2-core machine).

The facts are recorded from the real code paths, not listed by hand: for each family a full-size original file
whose header lists every tensor but whose data is a hole (a sparse file: no disk used, nothing read) is read with
`read_checkpoint`, its diffusers configs are written as `write_config_folder` writes them, and that folder is read
back, all with an empty cache of their own; every entry that lands in that cache goes into the bundle.

    python -m library.meta_facts_bundle          # rewrite the bundle (after changing diffusers, transformers,
                                                 # the model configs or the code that computes the facts)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from library import meta_model_cache

_DTYPE = torch.float16  # (any: the data is never read)


def write_sparse_original_file(family, dest: Path) -> None:
    """A full-size original-layout single file of `family` whose tensors are all zeros, written as a hole."""
    from library.families import ModelSize
    from library.safetensors_io import TensorEntry, _build_header
    from library.sd_checkpoint import SDCheckpoint, _with_prediction

    configs = _with_prediction(family.configs(ModelSize.FULL), family.prediction_type)
    checkpoint = SDCheckpoint(family, family.prediction_type, configs, {})
    entries = [TensorEntry(m.original, _DTYPE, m.original_shape, lambda: None)
               for table in checkpoint.tables().values() for m in table.mappings]
    header = _build_header(entries, {"modelspec.prediction_type": family.prediction_type.modelspec_name})
    data = sum(_DTYPE.itemsize * math.prod(e.shape) for e in entries)
    with open(dest, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)


@contextlib.contextmanager
def _recording_cache(folder: Path):
    """Facts computed inside land in `folder` (and none is taken from the shipped bundle)."""
    saved = {k: os.environ.get(k) for k in ("SDTRAIN_META_CACHE", "SDTRAIN_META_BUNDLE")}
    os.environ.update(SDTRAIN_META_CACHE=str(folder), SDTRAIN_META_BUNDLE="0")
    meta_model_cache._bundled.cache_clear()
    _clear_table_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        meta_model_cache._bundled.cache_clear()
        _clear_table_caches()


def _clear_table_caches() -> None:
    from library import key_maps

    key_maps._table_cached.cache_clear()  # (in-process memo of the tables: they must ask the cache again)


def build_entries() -> dict[str, object]:
    """bundle name -> value of every fact the released families' reading, writing and folder reading ask for."""
    from library.checkpoint_writer import write_config_folder
    from library.families import FAMILIES
    from library.sd_checkpoint import diffusers_folder_configs, read_checkpoint

    entries: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="meta_facts_") as tmp:
        cache = Path(tmp) / "cache"
        with _recording_cache(cache):
            for family in FAMILIES.values():
                single = Path(tmp) / f"{family.name}.safetensors"
                write_sparse_original_file(family, single)
                with read_checkpoint(single) as checkpoint:
                    assert checkpoint.family is family, (family.name, checkpoint.family.name)
                    folder = Path(tmp) / family.name
                    write_config_folder(checkpoint, folder)
                diffusers_folder_configs(folder).tables()
                single.unlink()
        for entry in sorted(cache.iterdir()):
            content = json.loads(entry.read_text())
            entries[meta_model_cache.bundle_name(content["inputs"])] = content["value"]
    return dict(sorted(entries.items()))


def write_bundle(entries: dict[str, object], dest: Path = meta_model_cache.BUNDLE) -> None:
    from library.atomic_files import atomic_file

    with atomic_file(dest) as tmp:
        # mtime 0: the same facts give the same bytes (a rebuild that changes nothing leaves git clean).
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(json.dumps({"entries": entries}, sort_keys=True, separators=(",", ":")).encode())


def read_bundle(path: Path = meta_model_cache.BUNDLE) -> dict[str, object]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)["entries"]


def main() -> None:
    entries = build_entries()
    write_bundle(entries)
    print(f"{meta_model_cache.BUNDLE}: {len(entries)} facts, {meta_model_cache.BUNDLE.stat().st_size} bytes")


if __name__ == "__main__":
    main()
