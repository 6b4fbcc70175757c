"""Atomic writes: a crash never leaves a half-written file or directory that a later run would load.

Everything is written next to its destination under a temporary name (``.<name>.tmp-*``) and moved into place with
``os.replace`` (atomic on POSIX within one filesystem). A directory being replaced is first moved aside
(``.<name>.old-*``), then deleted. A kill can leave these temporaries behind: :func:`remove_stale_temporaries` clears
them when the next run starts. Files and directories get the modes a plain ``open``/``mkdir`` would give under the
process umask (0644/0755 at umask 022), not ``mkstemp``'s 0600/0700, so the rest of a cluster group can read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY_PATTERNS = (".*.tmp-*", ".*.old-*")


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode(path: Path, mask: int) -> int:
    """The mode ``open``/``mkdir`` would have given ``path`` (executable files keep their x bits)."""
    if path.is_dir():
        return 0o777 & ~mask
    return (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it but symbolic links) the modes ``open``/``mkdir``
    would have given it under the umask."""
    path, mask = Path(path), current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                if not (Path(root) / name).is_symlink():  # (chmod would change the link's target)
                    os.chmod(Path(root) / name, _umask_mode(Path(root) / name, mask))
    os.chmod(path, _umask_mode(path, mask))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``path`` (replacing an existing one); on error it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp is 0700 and some writers (safetensors) create 0600 files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move ``src`` (a file or directory) to ``dst``, replacing what is there: a file atomically; an existing
    directory is first moved aside (``.<name>.old-*``), then deleted."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    elif src.is_dir() and (dst.exists() or dst.is_symlink()):
        dst.unlink()
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file for writing; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp-*`` / ``.<name>.old-*`` files and directories that a killed atomic write left in
    ``directory``; returns what was removed. Call it only when no other process writes there."""
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in Path(directory).glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed
