"""Streaming reader and writer for the safetensors format.

Why not the official ``safetensors`` package?  Its reader mmaps the whole file,
so every page we touch counts towards the process RSS, and ``save_file`` needs
every tensor in memory at once.  Converting a multi-GB checkpoint with it needs
several times the checkpoint size in RAM.  Here the reader uses plain
``seek`` + ``readinto`` of one tensor at a time, and the writer asks for one
tensor at a time, so peak memory stays at about one tensor.

Files written here are byte-identical to ``safetensors.torch.save_file`` output
for the same tensors (metadata keys are written sorted; the official library
writes them in hash order, which varies between runs).

A tensor whose bytes already lie unchanged in another file (``RawBytes``: a
conversion that only renames or reshapes it) is copied file to file by the
kernel (``os.copy_file_range``) without becoming a Python object: converting a
checkpoint then costs little more than copying it.

Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}``
(offsets relative to the end of the header), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch

from library.atomic_files import atomic_file

__all__ = [
    "RawBytes",
    "SafetensorsFormatError",
    "SafetensorsReader",
    "TensorEntry",
    "TensorInfo",
    "save_tensors",
    "write_safetensors",
]

if sys.byteorder != "little":  # the format is little-endian and we copy raw bytes
    raise ImportError("library.safetensors_io only supports little-endian machines")

# Official dtype codes, in the order of the Rust ``Dtype`` enum.  The official
# writer sorts tensors by this enum *descending*, then by name; this is
# "largest alignment first" only approximately (F32 comes before U32 before
# I32, F8_E4M3 before F8_E5M2), so we copy the enum order rather than sort by
# item size.  Dtypes this torch build lacks are skipped.
_DTYPE_ORDER = [
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
]
_CODE_TO_DTYPE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_ORDER if hasattr(torch, name)
}
_DTYPE_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in _CODE_TO_DTYPE.items()}
_DTYPE_RANK: dict[torch.dtype, int] = {dt: i for i, dt in enumerate(_CODE_TO_DTYPE.values())}

_MAX_HEADER_BYTES = 100_000_000  # same limit as the official reader
_ALIGNMENT = 8  # the official writer pads the header so that data starts 8-byte aligned
_METADATA_KEY = "__metadata__"


class SafetensorsFormatError(ValueError):
    """A file is not a valid safetensors file.  The message names the file."""


class TensorInfo(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class RawBytes(NamedTuple):
    """Where a tensor's bytes lie in a file, exactly as they are to be written (row-major, little-endian)."""

    path: Path
    offset: int
    nbytes: int


class TensorEntry(NamedTuple):
    """A tensor to write: declared up front, produced by ``load()`` only when its turn comes (or, with ``raw``,
    its bytes copied from where they lie)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    raw: RawBytes | None = None


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = dtype.itemsize
    for dim in shape:
        n *= dim
    return n


def _is_shape(value: object) -> bool:
    # bool is an int subclass in Python; [true] is not a valid shape.
    return isinstance(value, (list, tuple)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


# --------------------------------------------------------------------------- reader


class SafetensorsReader:
    """Read tensors one at a time from a safetensors file, without mmap.

    The header is fully validated on open, so a damaged file fails immediately
    with a SafetensorsFormatError that says what is wrong.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    # -- header validation

    def _error(self, what: str) -> SafetensorsFormatError:
        return SafetensorsFormatError(f"{self.path}: not a valid safetensors file: {what}")

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._error(
                f"the file is only {size} bytes long, too short for the 8-byte header length; "
                "it is empty or was cut off - fetch it again"
            )
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise self._error(
                f"the header length field says {header_len} bytes, which is absurd (limit {_MAX_HEADER_BYTES}); "
                "this is probably some other kind of file (a .ckpt/.bin pickle, an HTML error page, ...)"
            )
        if header_len > size - 8:
            raise self._error(
                f"the header length field says {header_len} bytes but the file has only {size - 8} bytes after it; "
                "the file is truncated or not a safetensors file"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as e:
            raise self._error(f"the header is not valid UTF-8 ({e})") from None
        except ValueError as e:  # json.JSONDecodeError or a duplicate key
            raise self._error(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error(f"the header must be a JSON object, got {type(header).__name__}")

        metadata = header.pop(_METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._error(f'"{_METADATA_KEY}" must be an object mapping strings to strings, got {metadata!r:.200}')
        self.metadata: dict[str, str] = metadata

        data_start = 8 + header_len
        entries = [self._parse_entry(name, spec) for name, spec in header.items()]
        # "File order" is data order; the official writer uses the same order in
        # the header, and reading in this order is sequential I/O.
        entries.sort(key=lambda e: e[:2])

        expected = 0
        for begin, end, info in entries:
            if begin != expected:
                problem = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
                raise self._error(f"tensor {info.name!r} starts at data offset {begin}, expected {expected}: it {problem}")
            expected = end
        data_size = size - data_start
        if data_size < expected:
            end, name = next((end, info.name) for _, end, info in entries if end > data_size)
            raise self._error(
                f"the file is truncated: the header says tensor {name!r} ends at byte {data_start + end} "
                f"but the file has only {size} bytes; the download or copy was probably interrupted - fetch it again"
            )
        if data_size > expected:
            raise self._error(
                f"the file has {data_size - expected} bytes of trailing garbage after the last tensor "
                f"(the header accounts for {data_start + expected} bytes, the file has {size}); "
                "it may have been overwritten in place or appended to - fetch it again"
            )
        self._infos = {info.name: info for _, _, info in entries}
        self._offsets = {info.name: data_start + begin for begin, _, info in entries}

    def _parse_entry(self, name: str, spec: object) -> tuple[int, int, TensorInfo]:
        if not isinstance(spec, dict):
            raise self._error(f"entry for tensor {name!r} must be an object, got {spec!r:.200}")
        missing = {"dtype", "shape", "data_offsets"} - spec.keys()
        if missing:
            raise self._error(f"entry for tensor {name!r} lacks {', '.join(sorted(missing))}")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if code not in _CODE_TO_DTYPE:
            raise self._error(
                f"tensor {name!r} has unknown dtype {code!r} (this torch supports {', '.join(_CODE_TO_DTYPE)})"
            )
        if not isinstance(shape, list) or not _is_shape(shape):
            raise self._error(f"tensor {name!r} has an invalid shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and _is_shape(offsets) and offsets[0] <= offsets[1]):
            raise self._error(f"tensor {name!r} has invalid data_offsets {offsets!r}; expected [begin, end] with begin <= end")
        dtype = _CODE_TO_DTYPE[code]
        nbytes = _nbytes(dtype, shape)
        begin, end = offsets
        if end - begin != nbytes:
            raise self._error(
                f"tensor {name!r} is {code} with shape {shape}, i.e. {nbytes} bytes, "
                f"but its data_offsets {offsets} span {end - begin} bytes"
            )
        return begin, end, TensorInfo(name, dtype, tuple(shape), nbytes)

    # -- public API

    def keys(self) -> list[str]:
        """Tensor names in the order their data appears in the file."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw_bytes(self, name: str) -> RawBytes:
        """Where the tensor's bytes lie in the file."""
        return RawBytes(self.path, self._offsets[name], self.info(name).nbytes)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh, writable memory that nothing else shares."""
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._file.seek(self._offsets[name])
            view = memoryview(buf.numpy())
            filled = 0
            while filled < info.nbytes:
                n = self._file.readinto(view[filled:])
                if not n:
                    raise self._error(
                        f"the file is truncated: tensor {name!r} could not be read completely "
                        f"(got {filled} of {info.nbytes} bytes); was it changed after it was opened?"
                    )
                filled += n
        return buf.view(info.dtype).reshape(info.shape)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would silently keep the last of two same-named tensors.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


# --------------------------------------------------------------------------- writer


def _build_header(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        # Sorted so that output is reproducible (the official writer uses hash order).
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for e in entries:
        nbytes = _nbytes(e.dtype, e.shape)
        header[e.name] = {
            "dtype": _DTYPE_TO_CODE[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    # Compact separators and raw UTF-8 match serde_json, i.e. the official output.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def _check_entries(entries: list[TensorEntry], metadata: dict[str, str] | None) -> None:
    seen: set[str] = set()
    for e in entries:
        if not isinstance(e.name, str) or e.name == _METADATA_KEY:
            raise ValueError(f"invalid tensor name {e.name!r}")
        if e.name in seen:
            raise ValueError(f"duplicate tensor name {e.name!r}")
        seen.add(e.name)
        if e.dtype not in _DTYPE_TO_CODE:
            raise ValueError(f"tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot store")
        if not _is_shape(e.shape):
            raise ValueError(f"tensor {e.name!r} has an invalid shape {e.shape!r}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata entry {key!r} must map a str to a str, got {type(value).__name__}; "
                "convert it with str() or json.dumps()"
            )


def write_safetensors(
    path: Path | str, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None, *,
    on_tensor: Callable[[], None] | None = None,
) -> None:
    """Write a safetensors file holding only one tensor in memory at a time.

    The header is built from the declared dtypes and shapes; each ``load()`` is
    called in turn and must return exactly the declared dtype and shape (an
    entry with ``raw`` bytes is copied instead).  The file appears at ``path``
    only once it is complete.  ``on_tensor`` is called after each tensor (a
    progress bar).
    """
    entries = [TensorEntry(e.name, e.dtype, tuple(e.shape), e.load, e.raw) for e in entries]
    _check_entries(entries, metadata)
    # Same order as the official writer, so that the files are byte-identical.
    entries.sort(key=lambda e: (-_DTYPE_RANK[e.dtype], e.name))
    header = _build_header(entries, metadata)

    with atomic_file(path) as tmp, open(tmp, "wb") as f, _RawCopier(f) as copier:
        f.write(header)
        for e in entries:
            if e.raw is not None:
                copier.copy(e)
                if on_tensor is not None:
                    on_tensor()
                continue
            tensor = e.load()
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"load() for tensor {e.name!r} returned {type(tensor).__name__}, not a torch.Tensor")
            if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
                raise ValueError(
                    f"tensor {e.name!r} was declared as {e.dtype} {list(e.shape)} "
                    f"but load() produced {tensor.dtype} {list(tensor.shape)}"
                )
            if tensor.numel():
                # Raw bytes through a uint8 view keep bf16/fp8 bit-exact (numpy has no bf16).
                data = tensor.detach().cpu().resolve_conj().contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del data
            del tensor  # drop it before the next load(), so only one is alive
            if on_tensor is not None:
                on_tensor()


class _RawCopier:
    """Copies byte ranges of source files to the end of the output file: in the kernel where the system can
    (`os.copy_file_range`, Linux), else in 16 MiB chunks through this process."""

    _CHUNK = 16 << 20

    def __init__(self, out):
        self.out = out
        self.sources: dict[Path, object] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")

    def __enter__(self) -> "_RawCopier":
        return self

    def __exit__(self, *exc) -> None:
        for source in self.sources.values():
            source.close()

    def copy(self, entry: TensorEntry) -> None:
        raw = entry.raw
        if raw.nbytes != _nbytes(entry.dtype, entry.shape):
            raise ValueError(f"tensor {entry.name!r}: {raw.nbytes} raw bytes for {entry.dtype} {list(entry.shape)}")
        source = self.sources.get(raw.path) or self.sources.setdefault(raw.path, open(raw.path, "rb"))
        self.out.flush()  # the kernel copy appends at the descriptor's position: nothing may wait in the buffer
        done = 0
        while done < raw.nbytes and self.kernel_copy:
            try:
                n = os.copy_file_range(source.fileno(), self.out.fileno(), raw.nbytes - done, raw.offset + done)
            except OSError:  # e.g. a file system that cannot: copy through this process instead
                self.kernel_copy = False
                break
            if n == 0:
                raise _truncated(raw, entry.name)
            done += n
        self.out.seek(0, os.SEEK_END)  # the buffered writer takes up the descriptor's new position
        source.seek(raw.offset + done)
        while done < raw.nbytes:
            chunk = source.read(min(self._CHUNK, raw.nbytes - done))
            if not chunk:
                raise _truncated(raw, entry.name)
            self.out.write(chunk)
            done += len(chunk)


def _truncated(raw: RawBytes, name: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{raw.path}: the file ended inside tensor {name!r}; was it changed or truncated "
                                  "while being read? Fetch it again.")


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write an in-memory dict of tensors (convenience wrapper over write_safetensors)."""
    write_safetensors(
        path,
        [TensorEntry(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()],
        metadata,
    )
