"""Permissions for files and folders written atomically through a temporary name.

`tempfile.mkstemp` and `mkdtemp` create owner-only entries (0600 and 0700) whatever the umask, so a
file renamed into place would stay unreadable to other users, unlike one written with `open`.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike[str]) -> None:
    """Give `path` the mode a plain `open` or `mkdir` would: 0666 or 0777 minus the umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())
