"""Client tokens: who may open a session on the gateway.

A token is a random string handed to one client (a person's browser, an AR
device). The gateway's token file keeps only each token's SHA-256 and its
name, so reading the file does not give a token away::

    {"tokens": [{"name": "kitchen-tablet", "sha256": "...", "created": "2026-11-23T04:50:00+00:00"}]}

``edgestream token create NAME`` adds one and prints it, once;
``edgestream token revoke NAME`` removes it. The gateway rereads the file
when it changes, so a new token works and a revoked one stops working
without a restart, and the sessions a revoked token opened are closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path

log = logging.getLogger("edgestream.gateway")

TOKEN_PREFIX = "es_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MAX_TOKEN_CHARS = 256


class TokenFileError(ValueError):
    """A token file that cannot be read or written, or a bad name."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    sha256: str
    created: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenFile:
    """The token file on disk: read, add, remove (the CLI's side)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[TokenEntry]:
        """The entries; an absent file has none."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenFileError(f"{self.path}: cannot read the token file: {exc}") from None
        try:
            return [TokenEntry(str(e["name"]), str(e["sha256"]), str(e.get("created", ""))) for e in raw["tokens"]]
        except (KeyError, TypeError) as exc:
            raise TokenFileError(f'{self.path}: not a token file (expected {{"tokens": [...]}}): {exc}') from None

    def create(self, name: str) -> str:
        """Add a token named ``name`` and return it (it is not stored, only its hash)."""
        if not NAME_PATTERN.match(name):
            raise TokenFileError(f"token name {name!r}: use 1-64 letters, digits and ._@-")
        entries = self.read()
        if any(entry.name == name for entry in entries):
            raise TokenFileError(f"a token named {name!r} exists; revoke it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._write([*entries, TokenEntry(name, digest(token), created)])
        return token

    def revoke(self, name: str) -> bool:
        """Remove the token named ``name``; ``False`` if there was none."""
        entries = self.read()
        kept = [entry for entry in entries if entry.name != name]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _write(self, entries: list[TokenEntry]) -> None:
        """Replace the file atomically (the gateway may be reading it), owner-readable only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"tokens": [dataclasses.asdict(entry) for entry in entries]}, indent=2)
        # A fresh name, created exclusively (O_EXCL, mode 600): nothing planted at a
        # predictable name (a symlink to another file) can be written through.
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text + "\n")
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


class TokenChecker:
    """The gateway's side: which client a presented token belongs to, from the file as it is now."""

    def __init__(self, path: str | Path) -> None:
        self.file = TokenFile(path)
        self._by_digest: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> bool:
        """Reread the file if it changed; ``True`` if it did. A broken file keeps the last good tokens."""
        try:
            stat = self.file.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return False
        try:
            entries = self.file.read()
        except TokenFileError as exc:
            log.error("%s; keeping the tokens read before", exc)
            return False
        self._stamp = stamp
        self._by_digest = {entry.sha256: entry.name for entry in entries}
        log.info("client tokens: %d from %s", len(self._by_digest), self.file.path)
        return True

    def client(self, token: str) -> str | None:
        """The name of the client holding ``token``, or ``None`` for a token that is unknown or revoked."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        presented = digest(token)
        for known, name in self._by_digest.items():
            if hmac.compare_digest(known, presented):
                return name
        return None

    def valid_names(self) -> set[str]:
        return set(self._by_digest.values())
