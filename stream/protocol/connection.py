"""The worker protocol as a sans-I/O state machine.

A :class:`Connection` holds the protocol state of one WebSocket between a
client (the gateway, or any SDK) and a worker. It performs no I/O: the asyncio
layers feed it the frames they receive and send the frames it returns.

States of the connection, client side::

    AWAITING_HELLO --hello--> OPEN                         (neither side has a key)
    AWAITING_HELLO --hello{challenge}--> send auth --> AWAITING_AUTH_OK --auth.ok--> OPEN

and worker side::

    (send hello) --> OPEN                                   (no key)
    (send hello{challenge}) --> AWAITING_AUTH --auth--> (send auth.ok) --> OPEN

The worker must send ``hello`` first. With a key (:mod:`.auth`), nothing but
``auth`` (and ``error``) is accepted before ``OPEN``, on either side: the
worker refuses jobs from a client that has not proved the key (``unauthorized``),
and the client sends nothing to a worker that has not proved it. A client with
a key also refuses a worker whose hello asks for no proof: that worker may be
anyone's.

States of a job, the same on both sides::

    (none) --job.start--> INPUT_OPEN --job.end--> INPUT_CLOSED
                          (job.text, job.flush and media only while INPUT_OPEN)
      INPUT_OPEN / INPUT_CLOSED --job.done or error(job_id)--> (gone)

Job ids only grow on a connection. That keeps the state bounded and tells a
late message for a finished job (a race that cannot be avoided: a frame sent
just before the peer ended the job) from a message for a job that never
existed: the first is dropped quietly (``receive_*`` returns ``None``), the
second is a protocol error.
"""

from __future__ import annotations

import enum

from . import auth
from .codec import DEFAULT_LIMITS, Limits, decode_message, encode_message
from .errors import ErrorCode, ProtocolError
from .frames import MediaFrame, decode_frame, encode_frame
from .messages import (
    SENT_BY_CLIENT,
    SENT_BY_WORKER,
    Auth,
    AuthOk,
    Error,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    Message,
    WorkerKind,
)


class Role(enum.Enum):
    CLIENT = "client"
    WORKER = "worker"


class JobPhase(enum.Enum):
    INPUT_OPEN = "input_open"
    INPUT_CLOSED = "input_closed"


class LocalProtocolError(RuntimeError):
    """This side tried to send something the protocol does not allow (a bug here)."""


class Connection:
    """Protocol state of one gateway<->worker connection, for one side of it.

    ``kind`` is the worker's kind: known to a worker from the start, learned by
    a client from the hello. ``key`` is the secret shared by gateway and
    workers; with it, both sides must prove they hold it (:mod:`.auth`).
    """

    def __init__(self, role: Role, kind: WorkerKind | None = None, limits: Limits = DEFAULT_LIMITS, key: bytes | None = None) -> None:
        if role is Role.WORKER and kind is None:
            raise ValueError("a worker connection needs its kind")
        self.role = role
        self.kind = kind
        self.limits = limits
        self.key = key
        self.hello: Hello | None = None
        self.authenticated = key is None
        """``True`` once jobs may flow: at once without a key, after the proofs with one."""
        self._client_nonce: str | None = None
        self._auth_ok_sent = False
        self.jobs: dict[int, JobPhase] = {}
        self._last_job_id = 0
        self._incoming = SENT_BY_CLIENT if role is Role.WORKER else SENT_BY_WORKER
        self._outgoing = SENT_BY_WORKER if role is Role.WORKER else SENT_BY_CLIENT

    # -- receiving -----------------------------------------------------------

    def receive_text(self, text: str | bytes) -> Message | None:
        """Decode and check one text frame from the peer.

        Returns the message, or ``None`` for a late message about a job that is
        already over. Raises :class:`ProtocolError` for anything else not allowed.
        """
        message = decode_message(text, self.limits)
        if type(message) not in self._incoming:
            raise ProtocolError(ErrorCode.BAD_STATE, f"a {self.role.value} does not accept {message.type!r}")
        if self.role is Role.CLIENT:
            return self._client_receives(message)
        return self._worker_receives(message)

    def receive_binary(self, data: bytes) -> MediaFrame | None:
        """Decode and check one binary frame; ``None`` if its job is already over."""
        frame = decode_frame(data, self.limits.max_frame_bytes)
        if self.role is Role.CLIENT:
            self._require_hello()
        self._require_authenticated()
        phase = self._phase(frame.job_id)
        if phase is None:
            return None
        if self.role is Role.WORKER and phase is not JobPhase.INPUT_OPEN:
            raise ProtocolError(ErrorCode.BAD_STATE, "media after job.end", frame.job_id)
        return frame

    def _worker_receives(self, message: Message) -> Message | None:
        if isinstance(message, Auth):
            return self._check_client_proof(message)
        if not self.authenticated and not isinstance(message, Error):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"{message.type} before auth: this worker needs proof of the key")
        if isinstance(message, JobStart):
            if message.job_id <= self._last_job_id:
                raise ProtocolError(
                    ErrorCode.JOB_ID_REUSED,
                    f"job id {message.job_id} is not greater than {self._last_job_id}",
                )
            self._last_job_id = message.job_id
            if message.kind is not self.kind:
                runs = self.kind.value if self.kind else "no"
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"this worker runs {runs} jobs, not {message.kind.value}", message.job_id)
            self.jobs[message.job_id] = JobPhase.INPUT_OPEN
            return message
        if isinstance(message, (JobText, JobFlush, JobEnd)):
            phase = self._phase(message.job_id)
            if phase is None:
                return None
            if phase is not JobPhase.INPUT_OPEN:
                raise ProtocolError(ErrorCode.BAD_STATE, f"{message.type} after job.end", message.job_id)
            if isinstance(message, JobEnd):
                self.jobs[message.job_id] = JobPhase.INPUT_CLOSED
            return message
        if isinstance(message, JobCancel):
            return message if self._phase(message.job_id) is not None else None
        return message  # Error, LoadRequest

    def _check_client_proof(self, message: Auth) -> Auth:
        if self.key is None or self.hello is None or self.hello.challenge is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "this worker asked for no auth")
        if self.authenticated or self._client_nonce is not None:
            raise ProtocolError(ErrorCode.BAD_STATE, "a second auth")
        expected = auth.proof(self.key, "client", self.hello.challenge, message.nonce, self.hello.worker_id)
        if not auth.proofs_match(expected, message.proof):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "wrong proof: the client does not hold this worker's key")
        self._client_nonce = message.nonce
        self.authenticated = True
        return message

    def _client_receives(self, message: Message) -> Message | None:
        if isinstance(message, Hello):
            return self._client_receives_hello(message)
        self._require_hello()
        if isinstance(message, AuthOk):
            return self._check_worker_proof(message)
        if not self.authenticated and not isinstance(message, Error):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"{message.type} before the worker proved the key")
        if isinstance(message, Error):
            # An error naming a job ends it; one naming a job this side never
            # opened is still worth reporting, so it is returned, not raised.
            if message.job_id is not None:
                self.jobs.pop(message.job_id, None)
            return message
        if isinstance(message, (JobResult, JobDone)):
            if self._phase(message.job_id) is None:
                return None
            if isinstance(message, JobDone):
                del self.jobs[message.job_id]
        return message

    def _client_receives_hello(self, message: Hello) -> Hello:
        if self.hello is not None:
            raise ProtocolError(ErrorCode.BAD_STATE, "a second hello")
        if self.kind is not None and message.kind is not self.kind:
            raise ProtocolError(ErrorCode.BAD_STATE, f"expected a {self.kind.value} worker, got {message.kind.value}")
        if message.challenge is not None and self.key is None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"worker {message.worker_id} requires a key, and this client has none")
        if message.challenge is None and self.key is not None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"worker {message.worker_id} does not prove that it holds the key: it may not be ours")
        self.hello = message
        self.kind = message.kind
        return message

    def _check_worker_proof(self, message: AuthOk) -> AuthOk:
        if self._client_nonce is None or self.authenticated:
            raise ProtocolError(ErrorCode.BAD_STATE, "auth.ok without a pending auth")
        assert self.key is not None and self.hello is not None and self.hello.challenge is not None
        expected = auth.proof(self.key, "worker", self.hello.challenge, self._client_nonce, self.hello.worker_id)
        if not auth.proofs_match(expected, message.proof):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"worker {self.hello.worker_id} does not hold the key (wrong proof)")
        self.authenticated = True
        return message

    def _require_hello(self) -> None:
        if self.hello is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "the worker must send hello first")

    def _require_authenticated(self) -> None:
        if not self.authenticated:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "media before auth")

    def _phase(self, job_id: int) -> JobPhase | None:
        """The job's phase; ``None`` for a job that is over; an error for one that never was."""
        phase = self.jobs.get(job_id)
        if phase is None and job_id > self._last_job_id:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"job {job_id} was never started")
        return phase

    # -- sending -------------------------------------------------------------

    def send(self, message: Message) -> str:
        """Check that ``message`` may be sent now, update the state, and encode it."""
        if type(message) not in self._outgoing:
            raise LocalProtocolError(f"a {self.role.value} does not send {message.type!r}")
        if self.role is Role.WORKER:
            self._worker_sends(message)
        else:
            self._client_sends(message)
        return encode_message(message)

    def send_frame(self, frame: MediaFrame) -> bytes:
        """Check and encode one binary frame for an open job."""
        phase = self.jobs.get(frame.job_id)
        if phase is None or (self.role is Role.CLIENT and phase is not JobPhase.INPUT_OPEN):
            raise LocalProtocolError(f"media for job {frame.job_id}, which takes none now")
        data = encode_frame(frame)
        if len(data) > self.limits.max_frame_bytes:
            raise LocalProtocolError(f"frame of {len(data)} bytes exceeds {self.limits.max_frame_bytes}")
        return data

    def _worker_sends(self, message: Message) -> None:
        if isinstance(message, Hello):
            if self.hello is not None:
                raise LocalProtocolError("hello was already sent")
            if (message.challenge is None) != (self.key is None):
                raise LocalProtocolError("hello carries a challenge exactly when the worker has a key")
            self.hello = message
            return
        if self.hello is None:
            raise LocalProtocolError("hello must be sent first")
        if isinstance(message, AuthOk):
            if not self.authenticated or self._client_nonce is None or self._auth_ok_sent:
                raise LocalProtocolError("auth.ok answers one accepted auth")
            self._auth_ok_sent = True
            return
        if not self.authenticated and not (isinstance(message, Error) and message.job_id is None):
            raise LocalProtocolError(f"{message.type} before the client proved the key")
        if isinstance(message, (JobResult, JobDone)) or (isinstance(message, Error) and message.job_id is not None):
            if message.job_id not in self.jobs:
                if isinstance(message, Error):
                    return  # refusing a job.start that never became a job
                raise LocalProtocolError(f"{message.type} for job {message.job_id}, which is not open")
            if not isinstance(message, JobResult):
                del self.jobs[message.job_id]

    def _client_sends(self, message: Message) -> None:
        if isinstance(message, Auth):
            if self._client_nonce is not None or self.authenticated:
                raise LocalProtocolError("auth answers the hello's challenge, once")
            self._client_nonce = message.nonce
            return
        if not self.authenticated and not isinstance(message, Error):
            raise LocalProtocolError(f"{message.type} before the worker proved the key")
        if isinstance(message, JobStart):
            if message.job_id <= self._last_job_id:
                raise LocalProtocolError(f"job id {message.job_id} is not greater than {self._last_job_id}")
            self._last_job_id = message.job_id
            self.jobs[message.job_id] = JobPhase.INPUT_OPEN
        elif isinstance(message, (JobText, JobFlush, JobEnd)):
            if self.jobs.get(message.job_id) is not JobPhase.INPUT_OPEN:
                raise LocalProtocolError(f"{message.type} for job {message.job_id}, which takes no input now")
            if isinstance(message, JobEnd):
                self.jobs[message.job_id] = JobPhase.INPUT_CLOSED
        elif isinstance(message, JobCancel) and message.job_id not in self.jobs:
            raise LocalProtocolError(f"cancel for job {message.job_id}, which is not open")

    def auth(self) -> Auth:
        """The client's answer to the hello's challenge (send it with :meth:`send`)."""
        if self.role is not Role.CLIENT or self.key is None or self.hello is None or self.hello.challenge is None:
            raise LocalProtocolError("auth answers a worker's challenge, with a key")
        nonce = auth.new_nonce()
        return Auth(nonce=nonce, proof=auth.proof(self.key, "client", self.hello.challenge, nonce, self.hello.worker_id))

    def auth_ok(self) -> AuthOk:
        """The worker's answer to an accepted ``auth`` (send it with :meth:`send`)."""
        if self.role is not Role.WORKER or self._client_nonce is None or self.hello is None or self.hello.challenge is None:
            raise LocalProtocolError("auth.ok answers an accepted auth")
        assert self.key is not None
        return AuthOk(proof=auth.proof(self.key, "worker", self.hello.challenge, self._client_nonce, self.hello.worker_id))

    def next_job_id(self) -> int:
        """A fresh job id for a client to use."""
        return self._last_job_id + 1

    def error_for(self, exc: ProtocolError) -> Error:
        """The ``error`` message that answers ``exc`` (it ends the job it names)."""
        return Error(code=exc.code, message=exc.message[:1024], job_id=exc.job_id)
