"""Atomic writes: a crash or an error never leaves a half-written output behind.

The trick is always the same: write under a temporary name in the *same*
directory as the destination (so the final rename stays on one filesystem and
is atomic), flush it to disk, then rename it over the destination.  Readers
see either the old complete output or the new complete output, never a mix.

A process killed outright (kill -9, power cut, out of memory) cannot clean up,
so its temporary stays behind; the next write of the same destination removes
such leftovers (see `_remove_stale_temporaries`), so repeated crashes do not
fill the disk.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["OutputPathError", "atomic_file", "atomic_directory", "check_writable_output"]

logger = logging.getLogger(__name__)

# A temporary of ours that nothing has changed for this long is a leftover of a killed write. A live writer
# changes its temporary all the time (every write updates the file's times; a directory's newest file counts),
# so a minute without a change means the writer is gone, and a crashed run is rarely restarted and back at the
# same save within a minute. Should a live writer in another process stall longer (a hung network disk), it
# loses its temporary and its save fails with an error; its destination stays complete either way.
STALE_AFTER_S = 60.0


class OutputPathError(ValueError):
    """The output path cannot be written (or would overwrite an input)."""


def _sibling(dest: Path, kind: str) -> Path:
    # Hidden name beside dest, so that a leftover after a power cut is easy to
    # recognise and does not look like a finished output.
    return dest.with_name(f".{dest.name}.{kind}-{secrets.token_hex(4)}")


def _last_change(path: Path) -> float:
    """The newest change time of a file, or of anything in a directory tree. st_ctime because moving a folder
    aside (atomic_directory's `.old-`) changes only that; st_mtime as well because on Windows st_ctime is the
    creation time."""
    times = [path.lstat()]
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            times += [Path(dirpath, name).lstat() for name in dirnames + filenames]
    return max(max(t.st_mtime, t.st_ctime) for t in times)


def _remove_stale_temporaries(dest: Path) -> None:
    """Remove what killed writes of ``dest`` left beside it: only names `_sibling(dest, "tmp" | "old")` makes,
    unchanged for STALE_AFTER_S. An `.old-` folder is the previous complete output moved aside; it is kept while
    ``dest`` is missing (the write was killed between its two renames), as it is then the only complete copy."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        candidates = [Path(entry.path) for entry in os.scandir(dest.parent) if pattern.fullmatch(entry.name)]
    except OSError:  # no parent folder: the write itself reports that
        return
    removed = []
    for path in candidates:
        try:
            if path.name.startswith(f".{dest.name}.old-") and not dest.exists():
                logger.warning("%s holds the previous %s, moved aside by a write that was interrupted; rename it "
                               "back if you need it", path, dest.name)
                continue
            if time.time() - _last_change(path) < STALE_AFTER_S:
                continue  # maybe a live writer in another process
            if path.is_dir() and not path.is_symlink():
                # Renamed first: a rename is atomic, so a writer that was about to move this folder into place
                # either did (the rename here fails) or will fail; rmtree never runs inside its finished output.
                doomed = _sibling(dest, "tmp")
                os.rename(path, doomed)
                shutil.rmtree(doomed)
            else:
                path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            continue  # gone meanwhile (its writer finished, or another cleanup)
        except OSError as e:  # cleanup must never fail the write itself
            logger.warning("could not remove the stale temporary %s (%s)", path, e.strerror or e)
    if removed:
        logger.info("removed %d stale temporar%s of %s left by interrupted writes: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", dest, ", ".join(removed))


def _fsync_path(path: Path) -> None:
    # A rename is only durable once both the file contents and the directory
    # entry have reached the disk; without this a crash can leave an empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath, name))
        _fsync_path(Path(dirpath))


@contextmanager
def atomic_file(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` on success.

    On an exception the temporary file is deleted and ``dest`` (if it already
    existed) is left exactly as it was.
    """
    dest = Path(dest)
    _remove_stale_temporaries(dest)
    tmp = _sibling(dest, "tmp")
    # Create the file ourselves (exclusively, with normal umask permissions) so
    # that no other writer can pick the same name.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(dest.parent)


@contextmanager
def atomic_directory(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; put it in place on success.

    An existing ``dest`` directory is replaced only after the new one is
    complete; on an exception the temporary directory is removed and ``dest``
    is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a directory; refusing to replace it with one")
    _remove_stale_temporaries(dest)
    tmp = _sibling(dest, "tmp")
    os.mkdir(tmp)
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        # Directories cannot be renamed over a non-empty directory, so the old
        # one is first moved aside; the window where dest is missing is two
        # renames long, and it is put back if the second rename fails.
        if dest.exists():
            old = _sibling(dest, "old")
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if old is not None:
                os.replace(old, dest)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(dest.parent)
    if old is not None:
        shutil.rmtree(old)


def _probe_writable(folder: Path) -> str | None:
    """Return why files cannot be created in ``folder``, or None if they can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "you do not have write permission there"
    # os.access is not the whole truth (read-only mounts, ACLs, /proc, network
    # filesystems, root ignoring modes), so really create and delete a file.
    probe = _sibling(folder / "write-probe", "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        return f"creating a file there failed ({e.strerror or e})"
    return None


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable_output(dest: Path | str, *, sources: Iterable[Path | str] = ()) -> Path:
    """Fail fast, before any expensive work, if ``dest`` cannot be written.

    Creates the parent folder if it is missing.  Raises OutputPathError if the
    parent cannot be created or written, or if ``dest`` is one of ``sources``
    (writing it would destroy an input while it is still being read).
    Returns ``dest`` as a Path.
    """
    dest = Path(dest)
    parent = Path(os.path.abspath(dest)).parent

    for src in sources:
        if _same_path(dest, Path(src)):
            raise OutputPathError(
                f"output path {dest} is the same as the input {src}; "
                "writing it would destroy the input while it is being read - choose a different output path"
            )

    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputPathError(
                f"cannot create the output folder {parent} for {dest} ({e.strerror or e}); "
                "check that no part of that path is an existing file, or choose another output path"
            ) from e

    reason = _probe_writable(parent)
    if reason is not None:
        raise OutputPathError(
            f"cannot write output {dest}: the folder {parent} is not writable ({reason}); "
            "fix its permissions or choose another output path"
        )
    return dest
