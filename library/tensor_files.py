"""Open any weight file (safetensors, or a PyTorch pickle: .ckpt / .pt / .pth / .bin) as a lazy tensor source.

A source lists names, shapes and dtypes without reading tensor data, and reads one tensor at a time, so that
conversion can stream a multi-GB checkpoint. Safetensors go through our streaming reader (plain reads, no
mmap, so touched pages do not pile up in RSS); pickles are memory-mapped by torch.

Pickles can run arbitrary code when loaded. We only ever unpickle with torch's weights-only unpickler, which
refuses anything beyond tensors and plain containers; a file that needs more is refused with the list of Python
objects it asks for, unless the user explicitly trusts it (`allow_unsafe_pickle`).
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from library.safetensors_io import RawBytes, SafetensorsFormatError, SafetensorsReader

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and says what to do."""


class UnsafePickleError(CheckpointError):
    """A pickle that would need to run code to load."""


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype, read (or computed) only when `load()` is called. `raw`: where exactly the
    bytes `load()` returns lie in a safetensors file, if they do (a writer may copy them without loading); a
    reshape keeps them, any other change of the values must drop them."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    raw: RawBytes | None = None

    @staticmethod
    def of(tensor: torch.Tensor) -> "LazyTensor":
        return LazyTensor(tuple(tensor.shape), tensor.dtype, lambda: tensor)


class TensorSource:
    """Named lazy tensors of one file, plus its string metadata and non-tensor values (epoch, global_step)."""

    def __init__(self, path: Path, tensors: dict[str, LazyTensor], metadata: dict[str, str],
                 values: dict[str, object], closer: Callable[[], None] | None = None):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self.values = values  # non-tensor top-level entries of a pickle, e.g. {"epoch": 3, "global_step": 1200}
        self._closer = closer

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tensor_file(path: str | Path, *, allow_unsafe_pickle: bool = False) -> TensorSource:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path (and that the download finished).")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a weight file (.safetensors, .ckpt, .pt, .bin)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy probably failed")
    if path.suffix.lower() == ".safetensors":
        return _open_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_unsafe_pickle)
    # Unknown suffix: sniff. A safetensors file starts with a small little-endian header length, a PyTorch zip
    # pickle with "PK".
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _open_pickle(path, allow_unsafe_pickle)
    return _open_safetensors(path)


def _open_safetensors(path: Path) -> TensorSource:
    try:
        reader = SafetensorsReader(path)
    except SafetensorsFormatError as e:
        known = "fetch it again" in str(e) or "other kind of file" in str(e)
        hint = "" if known else "; the file is damaged or not a safetensors file - fetch it again"
        raise CheckpointError(f"{e}{hint}") from e
    tensors = {}
    for name in reader.keys():
        info = reader.info(name)
        tensors[name] = LazyTensor(tuple(info.shape), info.dtype, lambda n=name: reader.read(n),
                                   raw=reader.raw_bytes(name))
    return TensorSource(path, tensors, dict(reader.metadata), {}, closer=reader.close)


def _torch_load(path: Path, *, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        # Legacy (pre-zip) pickles cannot be memory-mapped; read them whole.
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _open_pickle(path: Path, allow_unsafe: bool) -> TensorSource:
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # The safe loader fails both on pickles that ask for Python objects (possibly malicious) and on bytes
        # that are no pickle at all (corrupt download, random data): only the former is an unsafe-pickle case.
        wanted = _unsafe_globals(path, e)
        if not allow_unsafe:
            if wanted:
                raise UnsafePickleError(_unsafe_message(path, wanted)) from e
            raise CheckpointError(f"{path}: not a valid PyTorch checkpoint ({_unpickler_reason(e)}). The file is "
                                  "corrupt or not a model file at all; fetch it again. (Only if it is a checkpoint "
                                  "you trust in an unusual pickle format: --allow_unsafe_pickle reads it with the "
                                  "full loader.)") from e
        logger.warning("%s: loading with the full pickle loader because --allow_unsafe_pickle was given; this "
                       "runs code stored in the file", path)
        try:
            obj = _torch_load(path, weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"{path}: not a valid PyTorch checkpoint, even for the full pickle loader "
                                  f"({type(e2).__name__}: {e2}). Fetch the file again.") from e2
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a valid PyTorch checkpoint or truncated ({type(e).__name__}: {e}). "
                              "Fetch the file again.") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    values: dict[str, object] = {}
    # Lightning checkpoints wrap the weights in "state_dict" (sometimes twice).
    while "state_dict" in obj and isinstance(obj["state_dict"], dict):
        values.update({k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, torch.Tensor)})
        obj = obj["state_dict"]
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = LazyTensor.of(value)
        else:
            values.setdefault(name, value)
    return TensorSource(path, tensors, {}, values)


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The Python objects (module.name) a pickle asks for beyond tensors, found without running it."""
    try:
        wanted = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) format or not a checkpoint: torch cannot list them without loading
        wanted = []
    # The safe loader names the first object it refused ("Unsupported global: GLOBAL os.system ...").
    for name in re.findall(r"GLOBAL ([\w.]+)", str(error)):
        name = name if "." in name else f"builtins.{name}"  # torch prints builtins without their module
        if name not in wanted:
            wanted.append(name)
    return wanted


def _unpickler_reason(error: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), re.S)
    return match.group(1) if match else (str(error).splitlines() or [type(error).__name__])[0]


def _unsafe_message(path: Path, wanted: list[str]) -> str:
    listed = ", ".join(wanted[:8]) + (" ..." if len(wanted) > 8 else "")
    return (f"{path}: refused to load. This pickle asks for Python objects beyond tensors ({listed}); loading it "
            "would run code from the file, which is how malicious checkpoints attack. Nothing was executed. "
            "If you trust the file's origin, re-run with --allow_unsafe_pickle, or convert it once to "
            ".safetensors (tools/convert_diffusers20_original_sd.py --allow_unsafe_pickle in.ckpt out.safetensors) "
            "and use that from then on.")
