"""Key files: the secret a gateway and its workers share (``stream/protocol/auth.py``).

A key file holds 32 random bytes as hex digits, readable by its owner only.
``edgestream keys worker FILE`` writes one; copy it to every box of the
deployment and name it in ``[security] worker_key_file``.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

KEY_BYTES = 32
MIN_KEY_BYTES = 16


class KeyFileError(ValueError):
    """A key file that cannot be read or holds no usable key."""


def load_key(path: str | Path) -> bytes:
    """Read a key file (hex digits; surrounding whitespace is ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: the key must be hex digits (create one with `edgestream keys worker FILE`)") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"{path}: the key has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def is_private(path: str | Path) -> bool:
    """Whether only the owner may read the file (a key others can read is worth a warning)."""
    return not (os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def create_key_file(path: str | Path) -> None:
    """Write a new random key, readable by its owner only; an existing file is never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(secrets.token_hex(KEY_BYTES) + "\n")
