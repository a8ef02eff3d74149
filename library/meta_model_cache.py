"""Facts about diffusers / transformers models that are computed by building the model on the meta device (its
tensor names and shapes, its config with every default filled in), kept on disk between runs.

Building a meta model is cheap, but importing diffusers' model classes takes ~8 s on a 2-core machine, more than
converting an SD 1.5 file once its bytes are in the page cache; with these facts cached, converting between
layouts, merging and extracting need not import diffusers at all.

Where: `$SDTRAIN_META_CACHE` if set (an empty value turns the disk cache off), else
`$XDG_CACHE_HOME/sdtrain/meta_models/` (default `~/.cache/...`). An entry is named by a hash of everything the fact
depends on: what is asked, the component, the config, the installed diffusers and transformers versions (whose code
builds the model) and the source file of the function that computes it (so editing our code cannot leave an old
answer in use), so an entry made under other inputs is never read. An unreadable entry is rebuilt; a folder that
cannot be written only means the fact is computed again next time.

The facts of the released models (every family at full size, read from a single file or from the diffusers folder
we write) also ship with the code, in `model_configs/meta_facts.json.gz` (`library/meta_facts_bundle.py` builds it),
so that a user's first conversion is as fast as the later ones. Those entries are named without our code's digest
(an edit must not turn them all off); `tests/test_meta_model_cache.py` rebuilds the file and fails when it differs,
which is what keeps them true.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable


def cache_folder() -> Path | None:
    given = os.environ.get("SDTRAIN_META_CACHE")
    if given is not None:
        return Path(given) if given else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdtrain" / "meta_models"


BUNDLE = Path(__file__).parent / "model_configs" / "meta_facts.json.gz"


def entry_name(inputs: dict, compute: Callable[[], Any]) -> str:
    """The file name of the entry for these inputs (JSON-able), with the library versions and a digest of the
    source file that defines `compute` added."""
    code = hashlib.sha256(Path(compute.__code__.co_filename).read_bytes()).hexdigest()
    return _digest(dict(inputs, code=code)) + ".json"


def bundle_name(inputs: dict) -> str:
    """The name of these inputs' entry in the shipped bundle: the inputs and the library versions."""
    return _digest(inputs)


def _digest(inputs: dict) -> str:
    keyed = dict(inputs, diffusers=version("diffusers"), transformers=version("transformers"))
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _bundled() -> dict[str, Any]:
    if os.environ.get("SDTRAIN_META_BUNDLE") == "0":  # (how the bundle is rebuilt: from the models themselves)
        return {}
    try:
        with gzip.open(BUNDLE, "rt", encoding="utf-8") as f:
            return json.load(f)["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def cached(inputs: dict, compute: Callable[[], Any]) -> Any:
    """`compute()` (a JSON-able value), or the value shipped in the bundle or stored by a previous call with the
    same inputs."""
    bundled = _bundled().get(bundle_name(inputs))
    if bundled is not None:
        return bundled
    folder = cache_folder()
    if folder is None:
        return compute()
    entry = folder / entry_name(inputs, compute)
    try:
        return json.loads(entry.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    _write(entry, {"inputs": inputs, "value": value})
    return value


def _write(entry: Path, content: dict) -> None:
    from library.atomic_files import atomic_file

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(entry) as tmp:
            tmp.write_text(json.dumps(content))
    except OSError:
        pass
