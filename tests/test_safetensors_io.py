import filecmp
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.safetensors_io import (
    SafetensorsFormatError,
    SafetensorsReader,
    TensorEntry,
    save_tensors,
    write_safetensors,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _sample(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        # Random values (not round numbers) so that any lossy path would show.
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def _all_kinds() -> dict[str, torch.Tensor]:
    tensors = {}
    for i, dt in enumerate(_DTYPES):
        name = str(dt).split(".")[-1]
        tensors[f"w.{name}"] = _sample(dt, (3, 5), i)
        tensors[f"scalar.{name}"] = _sample(dt, (), 100 + i)
        tensors[f"empty.{name}"] = torch.empty((0, 4), dtype=dt)
    return tensors


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # Compare bits, so that NaNs and -0.0 count and bf16/fp16 must be bit-exact.
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# --------------------------------------------------------------------------- parity


def test_reads_files_written_by_official_library(tmp_path):
    tensors = _all_kinds()
    tensors["nan_bf16"] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)
    path = tmp_path / "official.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "héllo"})

    with SafetensorsReader(path) as r:
        assert r.metadata == {"format": "pt", "note": "héllo"}
        assert set(r.keys()) == set(tensors) and len(r) == len(tensors)
        assert "w.float32" in r and "missing" not in r
        for name, expected in tensors.items():
            info = r.info(name)
            assert (info.dtype, info.shape) == (expected.dtype, tuple(expected.shape))
            assert info.nbytes == expected.numel() * expected.element_size()
            got = r.read(name)
            _assert_same(got, expected)
        with pytest.raises(KeyError, match="missing"):
            r.info("missing")


def test_read_returns_fresh_writable_memory(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, path)
    with SafetensorsReader(path) as r:
        a, b = r.read("x"), r.read("x")
        a += 1  # would raise or corrupt `b` if memory were read-only or shared
        assert torch.equal(b, torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert a.is_contiguous()


def test_keys_are_in_file_order(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.float64)}, path)
    with SafetensorsReader(path) as r:
        assert r.keys() == ["c", "a", "b"]  # F64 first, then F32 by name


def test_files_we_write_load_in_official_library(tmp_path):
    tensors = _all_kinds()
    path = tmp_path / "ours.safetensors"
    save_tensors(path, tensors, metadata={"format": "pt", "a": "1"})

    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        _assert_same(loaded[name], expected)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "a": "1"}


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"k\x1f\n\"é": "v\u2028/\\😀"}])
def test_byte_identical_to_official_output(tmp_path, metadata):
    tensors = _all_kinds()
    # Names that exercise sorting (case, non-ASCII) and JSON escaping.
    tensors.update({"B": torch.ones(2), "a": torch.ones(2), "é\n\x01/\"\\": torch.ones(1), "😀": torch.ones(1)})
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_tensors(ours, tensors, metadata)
    save_file(tensors, theirs, metadata)
    assert ours.read_bytes() == theirs.read_bytes()


def test_multi_key_metadata_matches_official_up_to_key_order(tmp_path):
    # The official writer emits metadata in Rust HashMap order, which changes
    # from process to process, so only the parsed header can be compared.
    tensors = {"x": torch.randn(4), "y": torch.randn(3).half()}
    metadata = {k: f"value {k}" for k in "qwertyuiop"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_tensors(ours, tensors, metadata)
    save_file(tensors, theirs, metadata)
    a, b = ours.read_bytes(), theirs.read_bytes()
    (n,) = struct.unpack("<Q", a[:8])
    assert a[:8] == b[:8] and a[8 + n:] == b[8 + n:]
    assert json.loads(a[8:8 + n]) == json.loads(b[8:8 + n])
    assert list(json.loads(a[8:8 + n])["__metadata__"]) == sorted(metadata)  # ours is deterministic


def test_empty_file_matches_official(tmp_path):
    save_tensors(tmp_path / "ours.safetensors", {})
    save_file({}, tmp_path / "theirs.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    with SafetensorsReader(tmp_path / "ours.safetensors") as r:
        assert len(r) == 0 and r.metadata == {}


def test_non_contiguous_and_grad_tensors_are_written(tmp_path):
    base = torch.randn(4, 6, requires_grad=True)
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"t": base.t(), "s": base[:, ::2]})
    loaded = load_file(path)
    assert torch.equal(loaded["t"], base.t().detach())
    assert torch.equal(loaded["s"], base[:, ::2].detach())


# --------------------------------------------------------------------------- writer errors


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_load_failure_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "out.safetensors"

    def boom():
        raise RuntimeError("disk on fire")

    entries = [
        TensorEntry("a", torch.float32, (4,), lambda: torch.zeros(4)),
        TensorEntry("b", torch.float32, (4,), boom),
        TensorEntry("c", torch.float32, (4,), lambda: torch.zeros(4)),
    ]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(dest, entries)
    assert _leftovers(tmp_path) == []

    save_tensors(dest, {"old": torch.ones(3)})
    before = dest.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(dest, entries)
    assert dest.read_bytes() == before
    assert _leftovers(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize(
    "produced",
    [torch.zeros(5), torch.zeros(2, 2), torch.zeros(4, dtype=torch.float16), "not a tensor"],
    ids=["wrong-size", "wrong-shape", "wrong-dtype", "not-a-tensor"],
)
def test_declared_vs_produced_mismatch(tmp_path, produced):
    dest = tmp_path / "out.safetensors"
    entries = [
        TensorEntry("good", torch.float32, (4,), lambda: torch.zeros(4)),
        TensorEntry("liar", torch.float32, (4,), lambda: produced),
    ]
    with pytest.raises((ValueError, TypeError), match="liar"):
        write_safetensors(dest, entries)
    assert _leftovers(tmp_path) == []


def test_invalid_inputs_rejected_before_writing(tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(TypeError, match="'epoch'"):
        save_tensors(dest, {"x": torch.zeros(1)}, metadata={"epoch": 3})
    with pytest.raises(ValueError, match="duplicate tensor name 'x'"):
        write_safetensors(dest, [TensorEntry("x", torch.float32, (1,), lambda: torch.zeros(1))] * 2)
    with pytest.raises(ValueError, match="cannot store"):
        save_tensors(dest, {"c": torch.zeros(1, dtype=torch.complex128)})
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- corrupt files


def _valid_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}, path)
    return path.read_bytes()


def _raw(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CORRUPT = {
    "empty": lambda v: b"",
    "too-short": lambda v: b"\x05\x00\x00",
    "random-bytes": lambda v: bytes(range(256)) * 16,
    "absurd-header-length": lambda v: b"\xff" * 8 + b"{}",
    "header-longer-than-file": lambda v: struct.pack("<Q", 1000) + b"{}",
    "cut-in-header": lambda v: v[:20],
    "truncated-data": lambda v: v[:-3],
    "trailing-garbage": lambda v: v + b"garbage",
    "not-utf8": lambda v: _raw(b'{"\xff\xfe": 1}'),
    "not-json": lambda v: _raw(b"{not json"),
    "not-an-object": lambda v: _raw(b"[1, 2]"),
    "duplicate-key": lambda v: _raw(b'{"x": %s, "x": %s}' % (json.dumps(F32x2).encode(), json.dumps(F32x2).encode()), bytes(8)),
    "entry-not-object": lambda v: _raw({"x": [1]}),
    "missing-field": lambda v: _raw({"x": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "unknown-dtype": lambda v: _raw({"x": {**F32x2, "dtype": "F128"}}, bytes(8)),
    "shape-not-list": lambda v: _raw({"x": {**F32x2, "shape": 2}}, bytes(8)),
    "shape-negative": lambda v: _raw({"x": {**F32x2, "shape": [-2]}}, bytes(8)),
    "shape-float": lambda v: _raw({"x": {**F32x2, "shape": [2.0]}}, bytes(8)),
    "shape-bool": lambda v: _raw({"x": {**F32x2, "shape": [True, 2]}}, bytes(8)),
    "offsets-wrong-size": lambda v: _raw({"x": {**F32x2, "data_offsets": [0, 7]}}, bytes(7)),
    "offsets-reversed": lambda v: _raw({"x": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)),
    "offsets-not-pair": lambda v: _raw({"x": {**F32x2, "data_offsets": [0]}}, bytes(8)),
    "offsets-not-at-zero": lambda v: _raw({"x": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "offsets-overlap": lambda v: _raw({"x": F32x2, "y": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "offsets-gap": lambda v: _raw({"x": F32x2, "y": {**F32x2, "data_offsets": [12, 20]}}, bytes(20)),
    "metadata-not-str": lambda v: _raw({"__metadata__": {"epoch": 3}}),
    "metadata-not-object": lambda v: _raw({"__metadata__": "hi"}),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_format_error_naming_the_file(tmp_path, case):
    path = tmp_path / f"model-{case}.safetensors"
    path.write_bytes(CORRUPT[case](_valid_bytes(tmp_path)))
    with pytest.raises(SafetensorsFormatError) as excinfo:
        SafetensorsReader(path)
    assert path.name in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_truncated_message_says_what_happened(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_valid_bytes(tmp_path)[:-3])
    with pytest.raises(SafetensorsFormatError, match=r"truncated.*tensor 'b' ends at byte \d+ .*fetch it again"):
        SafetensorsReader(path)


def test_file_truncated_after_open_raises_on_read(tmp_path):
    path = tmp_path / "model.safetensors"
    # Big enough that the tensor is not already sitting in the read buffer.
    save_file({"a": torch.zeros(100_000)}, path)
    with SafetensorsReader(path) as r:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1000)
        with pytest.raises(SafetensorsFormatError, match="model.safetensors.*truncated"):
            r.read("a")


# --------------------------------------------------------------------------- streaming / memory

N_TENSORS = 50
ELEMS = 1 << 20  # 4 MiB of float32 each, 200 MiB in all

_CONVERT_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from library.safetensors_io import SafetensorsReader, TensorEntry, save_tensors, write_safetensors

    def peak_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    src, dst, warm = sys.argv[1:4]
    # Warm up every code path on a tiny file so that lazily loaded code and
    # allocator arenas are already part of the baseline.
    save_tensors(warm, {"w": torch.ones(16)})
    with SafetensorsReader(warm) as r:
        write_safetensors(warm, [TensorEntry(n, r.info(n).dtype, r.info(n).shape, lambda n=n: r.read(n)) for n in r.keys()])
    baseline = peak_bytes()

    with SafetensorsReader(src) as r:
        entries = [
            TensorEntry(n, r.info(n).dtype, r.info(n).shape, lambda n=n: r.read(n) * 1)  # *1: a real conversion step
            for n in r.keys()
        ]
        write_safetensors(dst, entries, metadata=r.metadata)
    print(peak_bytes() - baseline)
    """
)


def test_streaming_conversion_keeps_peak_memory_near_one_tensor(tmp_path):
    src, dst = tmp_path / "big.safetensors", tmp_path / "converted.safetensors"
    entries = [
        TensorEntry(f"layer.{i:02d}.weight", torch.float32, (ELEMS,), lambda i=i: torch.full((ELEMS,), float(i)))
        for i in range(N_TENSORS)
    ]
    write_safetensors(src, entries, metadata={"source": "lazy"})
    size = src.stat().st_size
    assert size > N_TENSORS * ELEMS * 4

    proc = subprocess.run(
        [sys.executable, "-c", _CONVERT_SCRIPT, str(src), str(dst), str(tmp_path / "warm.safetensors")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    increase = int(proc.stdout.strip().splitlines()[-1])
    assert increase < 0.4 * size, f"peak RSS grew by {increase / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"

    assert filecmp.cmp(src, dst, shallow=False)  # same names, order, metadata and data


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_raw_byte_copies_equal_loaded_writes(tmp_path, monkeypatch, kernel_copy):
    """Entries whose bytes are copied from a source file (renamed, reshaped) give the file that loading and writing
    them gives: byte-identical, with the kernel copy and with the copy through the process (other systems)."""
    import library.safetensors_io as sio

    tensors = _all_kinds()
    save_file(tensors, tmp_path / "source.safetensors")
    if not kernel_copy:
        monkeypatch.delattr(sio.os, "copy_file_range", raising=False)
    monkeypatch.setattr(sio._RawCopier, "_CHUNK", 5)  # several chunks per tensor on the fallback path
    with SafetensorsReader(tmp_path / "source.safetensors") as reader:
        loaded = [TensorEntry(f"renamed.{k}", t.dtype, tuple(t.shape), lambda k=k: reader.read(k))
                  for k, t in tensors.items()]
        copied = [TensorEntry(f"renamed.{k}", t.dtype, tuple(t.shape), _never_loaded, reader.raw_bytes(k))
                  for k, t in tensors.items()]
        write_safetensors(tmp_path / "loaded.safetensors", loaded, {"a": "b"})
        write_safetensors(tmp_path / "copied.safetensors", copied, {"a": "b"})
    assert filecmp.cmp(tmp_path / "loaded.safetensors", tmp_path / "copied.safetensors", shallow=False)


def _never_loaded():
    raise AssertionError("a raw entry must be copied, not loaded")


def test_raw_copy_from_a_source_truncated_meanwhile_fails_and_writes_nothing(tmp_path):
    tensors = _all_kinds()
    save_file(tensors, tmp_path / "source.safetensors")
    with SafetensorsReader(tmp_path / "source.safetensors") as reader:
        entries = [TensorEntry(k, t.dtype, tuple(t.shape), _never_loaded, reader.raw_bytes(k))
                   for k, t in tensors.items()]
    size = (tmp_path / "source.safetensors").stat().st_size
    with open(tmp_path / "source.safetensors", "r+b") as f:
        f.truncate(size - 16)
    with pytest.raises(SafetensorsFormatError, match="source.safetensors: the file ended inside tensor"):
        write_safetensors(tmp_path / "out.safetensors", entries)
    assert not (tmp_path / "out.safetensors").exists()
