"""What every worker kind implements: load a model, run one job."""

from __future__ import annotations

import abc
from typing import ClassVar

from stream.protocol import WorkerKind

from .job import Job
from .model_files import ModelFile


class Engine(abc.ABC):
    """The model side of a worker; :mod:`workers.server` is the transport side.

    ``run`` reads the job's inputs and emits its results. Blocking model calls
    go to threads so that the worker's event loop keeps answering pings, load
    requests and cancels while a model computes.
    """

    kind: ClassVar[WorkerKind]
    rate_unit: ClassVar[str]
    """Unit of the service rate in load reports (``audio_s``, ``tokens``, ``frames``)."""

    def __init__(self, model: ModelFile) -> None:
        self.model = model
        self.max_text_chars: int | None = None
        """Text one job may send in all (``job.text``), counted by the server as it arrives,
        before it is queued (``None``: only the protocol's message size limits it)."""

    @abc.abstractmethod
    async def run(self, job: Job) -> None:
        """Run ``job`` to completion; raise :class:`~workers.job.JobCancelled` if cancelled."""

    async def settled(self) -> None:  # noqa: B027 - a hook: engines whose work ends with its job need not write one
        """Return once no model work is running, that of jobs already over included (a
        cancelled job's decode may not be stoppable); the idle trim waits for this."""

    def close(self) -> None:  # noqa: B027 - a hook: engines with nothing to free need not write one
        """Free the model's resources."""
