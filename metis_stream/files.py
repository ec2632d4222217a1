"""Private files on this machine: the one way metis-stream writes a secret to disk.

Job tokens, job specs and the server's secret are written here; each is readable
only by its owner from the moment it exists, and a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode 0700 (``mkdir(parents=True)``
    would give the parents the default mode)."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            each.mkdir(mode=0o700)


def write_private(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``path`` whole under a temporary name, then put it in place.

    ``replace=False`` keeps a file that is already there (the first writer wins, also
    between processes): returns False when it was kept.
    """
    make_private_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created with its final mode, so the content is never readable by others; fchmod
    # because the umask may have narrowed it further than asked.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)  # atomic, and fails if the file exists
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)
