"""Mutual authentication of a gateway and a worker on a shared key (HMAC-SHA256).

Both ends of a worker link hold the same secret key (``edgestream keys
worker``). A worker that has one puts a fresh random ``challenge`` in its
``hello``; the client answers with ``auth``: a nonce of its own and a proof
that it knows the key; the worker checks the proof and answers ``auth.ok``
with a proof of its own over both nonces. Until the client has checked that
proof, it sends the worker nothing else, so a worker without the key (a
rogue box answering on a worker's address) never receives a frame of audio;
and a worker refuses every job until the client has proved itself, so a
rogue gateway cannot use it::

    worker                                   client (gateway)
      hello {challenge: Nw}        ---->
                                   <----    auth {nonce: Nc, proof: H(k, "client", Nw, Nc, id)}
      auth.ok {proof: H(k, "worker", Nw, Nc, id)}  ---->

Each proof names its sender's role, so one side's proof is never valid as the
other's, and both nonces are fresh per connection, so a recorded exchange
cannot be replayed. The key never travels. This authenticates the ends, it
does not encrypt: use TLS (``wss://``) for that.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32


def new_nonce() -> str:
    """A fresh random nonce, as 64 hex digits."""
    return secrets.token_hex(NONCE_BYTES)


def proof(key: bytes, role: str, worker_nonce: str, client_nonce: str, worker_id: str) -> str:
    """The proof that the ``role`` side ("client" or "worker") of this exchange holds ``key``."""
    text = "\n".join(("edgestream-auth-v1", role, worker_nonce, client_nonce, worker_id))
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def proofs_match(expected: str, got: str) -> bool:
    """Compare in constant time, so a wrong proof's timing tells nothing about the right one."""
    return hmac.compare_digest(expected.encode("ascii", "replace"), got.encode("ascii", "replace"))
