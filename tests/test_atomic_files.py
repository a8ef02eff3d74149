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
