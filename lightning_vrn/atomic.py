"""Atomic file writes: every output goes to a temporary name beside it and is renamed when complete; and a
file's content identity (:func:`file_sha256`)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` if the block succeeds.

    A crash or exception inside the block removes the temporary file and leaves any existing
    ``path`` untouched, so a complete-looking file is always a complete file. A full disk is an
    OSError naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    os.chmod(temp, open_mode())  # mkstemp makes 0600
    try:
        yield Path(temp)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException as error:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(error.errno, f"no space left to write {path} ({error.strerror}); free disk space, then "
                                       f"rerun the same command") from None
        raise


def open_mode() -> int:
    """The permission bits ``open()`` gives a new file here (0o666 less the umask): temporary files get 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
