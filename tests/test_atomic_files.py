import os
from pathlib import Path

import pytest

from library.atomic_files import OutputPathError, atomic_directory, atomic_file, check_writable_output


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- atomic_file


def test_atomic_file_success_creates_dest(tmp_path):
    dest = tmp_path / "out.bin"
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-")
        tmp.write_bytes(b"new")
        assert not dest.exists()  # nothing visible until the block finishes
    assert dest.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


def test_atomic_file_replaces_existing_on_success(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_file(str(dest)) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("existing", [None, b"old"])
def test_atomic_file_failure_leaves_dest_untouched(tmp_path, existing):
    dest = tmp_path / "out.bin"
    if existing is not None:
        dest.write_bytes(existing)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(dest) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("crash")
    if existing is None:
        assert _names(tmp_path) == []
    else:
        assert dest.read_bytes() == existing
        assert _names(tmp_path) == ["out.bin"]


def test_atomic_file_keyboard_interrupt_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


# --------------------------------------------------------------------------- atomic_directory


def test_atomic_directory_creates_new(tmp_path):
    dest = tmp_path / "model"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        assert not dest.exists()
    assert (dest / "sub" / "w.bin").read_bytes() == b"w"
    assert _names(tmp_path) == ["model"]


def test_atomic_directory_replaces_existing_only_on_success(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert _names(dest) == ["old.txt"]
    assert _names(tmp_path) == ["model"]

    with atomic_directory(dest) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # the old one stays until the new one is complete
    assert _names(dest) == ["new.txt"]
    assert _names(tmp_path) == ["model"]  # the old copy moved aside is gone too


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    dest = tmp_path / "model"
    dest.write_text("i am a file")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(dest):
            pass
    assert dest.read_text() == "i am a file"


# --------------------------------------------------------------------------- leftovers of killed writes


def _stale(path: Path, *, directory: bool = False) -> Path:
    if directory:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "w.bin").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


def test_next_write_removes_stale_temporaries_of_the_same_target_only(tmp_path, monkeypatch, caplog):
    import library.atomic_files as atomic_files

    monkeypatch.setattr(atomic_files, "STALE_AFTER_S", 0.0)  # as if the killed writes were long ago
    (tmp_path / "out.bin").write_bytes(b"old")
    ours = [_stale(tmp_path / ".out.bin.tmp-0123abcd"), _stale(tmp_path / ".out.bin.tmp-deadbeef")]
    others = ["out.bin.tmp-0123abcd",  # not hidden: not ours
              ".out.bin.tmp-0123abc",  # 7 hex digits
              ".out.bin.tmp-0123abcdx", ".out.bin.bak-0123abcd", ".other.bin.tmp-0123abcd",
              ".out.bin.tmp-0123ABCD",  # token_hex is lower case
              ".xout.bin.tmp-0123abcd", "notes.txt"]
    for name in others:
        _stale(tmp_path / name)
    with caplog.at_level("INFO", logger="library.atomic_files"):
        with atomic_file(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"new")
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert _names(tmp_path) == sorted(others + ["out.bin"])
    assert not any(p.exists() for p in ours)
    logged = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(logged) == 1 and all(p.name in logged[0] for p in ours) and "out.bin" in logged[0]


def test_atomic_directory_removes_its_stale_temporaries_and_moved_aside_copies(tmp_path, monkeypatch):
    import library.atomic_files as atomic_files

    monkeypatch.setattr(atomic_files, "STALE_AFTER_S", 0.0)
    dest = tmp_path / "state"
    dest.mkdir()
    _stale(tmp_path / ".state.tmp-00000001", directory=True)
    _stale(tmp_path / ".state.old-00000002", directory=True)  # dest exists: a finished write's old copy
    _stale(tmp_path / ".statex.tmp-00000003", directory=True)
    with atomic_directory(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == [".statex.tmp-00000003", "state"]
    assert _names(dest) == ["new.txt"]


def test_a_moved_aside_copy_is_kept_while_the_target_is_missing(tmp_path, monkeypatch):
    """Killed between atomic_directory's two renames: `.old-` holds the only complete copy."""
    import library.atomic_files as atomic_files

    monkeypatch.setattr(atomic_files, "STALE_AFTER_S", 0.0)
    previous = _stale(tmp_path / ".state.old-00000002", directory=True)
    with atomic_directory(tmp_path / "state") as tmp:
        (tmp / "new.txt").write_text("new")
    assert (previous / "sub" / "w.bin").read_bytes() == b"half"


def test_recent_temporaries_are_left_to_a_possible_live_writer(tmp_path):
    young = _stale(tmp_path / ".out.bin.tmp-0123abcd")
    with atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"new")
    assert young.exists()


def test_a_write_killed_with_sigkill_is_cleaned_up_by_the_next_one(tmp_path, monkeypatch):
    """A real kill -9 in the middle of a big write: the old file stays intact, the temporary stays behind, and
    the next write of the same file removes it."""
    import signal
    import subprocess
    import sys

    import library.atomic_files as atomic_files

    dest = tmp_path / "model.bin"
    dest.write_bytes(b"previous complete file")
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from library.atomic_files import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp, open(tmp, 'wb') as f:\n"
        "    f.write(b'x' * 2**20); f.flush()\n"
        "    print('writing', flush=True)\n"
        "    while True:\n"
        "        f.write(b'x' * 2**16); time.sleep(0.01)\n"), str(dest)],
        stdout=subprocess.PIPE, text=True, cwd=Path(atomic_files.__file__).parent.parent)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".model.bin.tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size >= 2**20
    assert dest.read_bytes() == b"previous complete file"

    monkeypatch.setattr(atomic_files, "STALE_AFTER_S", 0.0)  # the restart comes a while later
    with atomic_file(dest) as tmp:
        tmp.write_bytes(b"next")
    assert _names(tmp_path) == ["model.bin"] and dest.read_bytes() == b"next"


# --------------------------------------------------------------------------- check_writable_output


def test_check_ok_and_creates_missing_parent(tmp_path):
    dest = tmp_path / "a" / "b" / "out.safetensors"
    assert check_writable_output(dest, sources=[tmp_path / "in.safetensors"]) == dest
    assert dest.parent.is_dir()
    assert _names(dest.parent) == []  # the probe file is cleaned up


def test_check_rejects_output_equal_to_input(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="model.safetensors.*same as the input"):
        check_writable_output(src, sources=[tmp_path / "other", src])
    # Also when spelled differently (relative path through "..", symlink).
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputPathError):
        check_writable_output(tmp_path / "d" / ".." / "model.safetensors", sources=[str(src)])
    (tmp_path / "link.safetensors").symlink_to(src)
    with pytest.raises(OutputPathError):
        check_writable_output(tmp_path / "link.safetensors", sources=[src])
    # And for a source that does not exist yet (e.g. a directory to be written).
    with pytest.raises(OutputPathError):
        check_writable_output(tmp_path / "new_dir", sources=[tmp_path / "d" / ".." / "new_dir"])


def test_check_rejects_parent_that_is_a_file(tmp_path):
    (tmp_path / "notadir").write_text("")
    dest = tmp_path / "notadir" / "sub" / "out.safetensors"
    with pytest.raises(OutputPathError, match="notadir") as excinfo:
        check_writable_output(dest)
    assert "out.safetensors" in str(excinfo.value)


def _can_write_in(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_check_rejects_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _can_write_in(locked):
            with pytest.raises(OutputPathError, match=r"locked.*not writable"):
                check_writable_output(locked / "out.safetensors")
            return
    finally:
        locked.chmod(0o700)
    # Running as root: file modes do not stop us.  /proc exists and passes
    # os.access for root, but no file can be created in it, which exercises
    # the real-probe branch.
    if not Path("/proc/self").is_dir() or _can_write_in(Path("/proc")):
        pytest.skip("running as root and no unwritable folder available to test with")
    with pytest.raises(OutputPathError, match=r"/proc.*not writable"):
        check_writable_output("/proc/out.safetensors")


def test_check_reports_missing_permission(tmp_path, monkeypatch):
    # The os.access branch, which the chmod test cannot reach when run as root.
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputPathError, match="write permission"):
        check_writable_output(tmp_path / "out.safetensors")
