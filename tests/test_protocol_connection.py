"""The per-connection state machine, driven on both sides without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.protocol import (
    Connection,
    Error,
    ErrorCode,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobPhase,
    JobResult,
    JobStart,
    JobText,
    LoadReport,
    LoadRequest,
    LocalProtocolError,
    MediaFormat,
    MediaFrame,
    ProtocolError,
    Role,
    WorkerKind,
)
from tests.conftest import worker_hello

HELLO = worker_hello(WorkerKind.TTS)


def pair() -> tuple[Connection, Connection]:
    client, worker = Connection(Role.CLIENT), Connection(Role.WORKER, WorkerKind.TTS)
    client.receive_text(worker.send(HELLO))
    return client, worker


def refused(code: ErrorCode, receive, data) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        receive(data)
    assert info.value.code is code, info.value
    return info.value


def test_job_lifecycle_on_both_sides():
    client, worker = pair()
    assert client.hello == HELLO and client.kind is WorkerKind.TTS
    start = worker.receive_text(client.send(JobStart(job_id=1, kind=WorkerKind.TTS, params={"text": "hi"})))
    assert isinstance(start, JobStart) and worker.jobs == {1: JobPhase.INPUT_OPEN}
    worker.receive_text(client.send(JobText(job_id=1, seq=0, text="more")))
    assert isinstance(worker.receive_text(client.send(JobFlush(job_id=1))), JobFlush)
    assert worker.jobs[1] is JobPhase.INPUT_OPEN  # a flush keeps the job's input open
    worker.receive_text(client.send(JobEnd(job_id=1)))
    assert worker.jobs[1] is JobPhase.INPUT_CLOSED and client.jobs[1] is JobPhase.INPUT_CLOSED
    frame = MediaFrame(1, 0, MediaFormat.PCM_S16LE, b"\0\0", 1, 22050)
    assert client.receive_binary(worker.send_frame(frame)) == frame
    client.receive_text(worker.send(JobResult(job_id=1, seq=0, data={"clause": "hi"})))
    client.receive_text(worker.send(JobDone(job_id=1, reason="complete")))
    assert worker.jobs == {} and client.jobs == {}


def test_client_requires_hello_first():
    client, worker = Connection(Role.CLIENT), Connection(Role.WORKER, WorkerKind.STT)
    refused(
        ErrorCode.BAD_STATE, client.receive_text, LoadReport(running=0, queued=0, capacity=1, service_rate=0, rate_unit="x", jobs_completed=0).model_dump_json()
    )
    with pytest.raises(LocalProtocolError):
        worker.send(LoadReport(running=0, queued=0, capacity=1, service_rate=0, rate_unit="x", jobs_completed=0))


def test_second_hello_is_refused():
    client, _ = pair()
    refused(ErrorCode.BAD_STATE, client.receive_text, HELLO.model_dump_json())


def test_messages_in_the_wrong_direction_are_refused():
    client, worker = pair()
    refused(ErrorCode.BAD_STATE, worker.receive_text, HELLO.model_dump_json())
    refused(ErrorCode.BAD_STATE, worker.receive_text, JobDone(job_id=1, reason="complete").model_dump_json())
    refused(ErrorCode.BAD_STATE, client.receive_text, JobStart(job_id=1, kind=WorkerKind.TTS).model_dump_json())
    with pytest.raises(LocalProtocolError):
        client.send(JobDone(job_id=1, reason="complete"))


def test_job_ids_must_grow():
    _, worker = pair()
    worker.receive_text(JobStart(job_id=5, kind=WorkerKind.TTS).model_dump_json())
    error = refused(ErrorCode.JOB_ID_REUSED, worker.receive_text, JobStart(job_id=5, kind=WorkerKind.TTS).model_dump_json())
    assert error.job_id is None  # must not end the live job 5 on the client
    refused(ErrorCode.JOB_ID_REUSED, worker.receive_text, JobStart(job_id=3, kind=WorkerKind.TTS).model_dump_json())
    assert worker.jobs == {5: JobPhase.INPUT_OPEN}


def test_wrong_kind_is_refused_and_names_the_job():
    _, worker = pair()
    error = refused(ErrorCode.BAD_PARAMS, worker.receive_text, JobStart(job_id=1, kind=WorkerKind.STT).model_dump_json())
    assert error.job_id == 1 and worker.jobs == {}
    assert worker.error_for(error).job_id == 1


def test_input_for_a_job_that_never_existed_is_an_error_but_late_input_is_dropped():
    _, worker = pair()
    refused(ErrorCode.UNKNOWN_JOB, worker.receive_text, JobEnd(job_id=9).model_dump_json())
    worker.receive_text(JobStart(job_id=1, kind=WorkerKind.TTS).model_dump_json())
    worker.send(JobDone(job_id=1, reason="cancelled"))
    # Sent by the client before it saw job.done: a race, not an error.
    assert worker.receive_text(JobText(job_id=1, seq=3, text="late").model_dump_json()) is None
    assert worker.receive_text(JobCancel(job_id=1).model_dump_json()) is None
    from stream.protocol import encode_frame

    assert worker.receive_binary(encode_frame(MediaFrame(1, 0, MediaFormat.PNG, b"x"))) is None


def test_input_after_end_is_a_state_error_for_that_job():
    _, worker = pair()
    worker.receive_text(JobStart(job_id=1, kind=WorkerKind.TTS).model_dump_json())
    worker.receive_text(JobEnd(job_id=1).model_dump_json())
    error = refused(ErrorCode.BAD_STATE, worker.receive_text, JobText(job_id=1, seq=0, text="x").model_dump_json())
    assert error.job_id == 1
    assert refused(ErrorCode.BAD_STATE, worker.receive_text, JobFlush(job_id=1).model_dump_json()).job_id == 1


def test_an_error_naming_a_job_ends_it_on_both_sides():
    client, worker = pair()
    worker.receive_text(client.send(JobStart(job_id=1, kind=WorkerKind.TTS)))
    message = client.receive_text(worker.send(Error(code=ErrorCode.BUSY, message="full", job_id=1)))
    assert isinstance(message, Error) and client.jobs == {} and worker.jobs == {}
    # Results that crossed the error on the wire are dropped quietly.
    assert client.receive_text(JobResult(job_id=1, seq=0, data={}).model_dump_json()) is None


def test_client_cannot_send_for_jobs_it_does_not_have():
    client, _ = pair()
    with pytest.raises(LocalProtocolError):
        client.send(JobText(job_id=1, seq=0, text="x"))
    client.send(JobStart(job_id=1, kind=WorkerKind.TTS))
    with pytest.raises(LocalProtocolError):
        client.send(JobStart(job_id=1, kind=WorkerKind.TTS))
    client.send(JobEnd(job_id=1))
    with pytest.raises(LocalProtocolError):
        client.send_frame(MediaFrame(1, 0, MediaFormat.PNG, b"x"))
    with pytest.raises(LocalProtocolError):
        client.send(JobFlush(job_id=1))
    assert client.next_job_id() == 2


def test_load_request_and_report():
    client, worker = pair()
    assert isinstance(worker.receive_text(client.send(LoadRequest())), LoadRequest)
    report = LoadReport(running=1, queued=0, capacity=2, service_rate=3.5, rate_unit="audio_s", jobs_completed=4)
    assert client.receive_text(worker.send(report)) == report


# A random walk over client actions: the two state machines never disagree.
actions = st.lists(st.tuples(st.sampled_from(["start", "text", "flush", "end", "cancel", "done", "error", "result"]), st.integers(1, 4)), max_size=40)


@settings(max_examples=300)
@given(actions)
def test_client_and_worker_states_stay_in_step(steps):
    client, worker = pair()
    for action, job_id in steps:
        try:
            if action == "start":
                data = client.send(JobStart(job_id=client.next_job_id(), kind=WorkerKind.TTS))
                worker.receive_text(data)
            elif action == "text":
                worker.receive_text(client.send(JobText(job_id=job_id, seq=0, text="x")))
            elif action == "flush":
                worker.receive_text(client.send(JobFlush(job_id=job_id)))
            elif action == "end":
                worker.receive_text(client.send(JobEnd(job_id=job_id)))
            elif action == "cancel":
                worker.receive_text(client.send(JobCancel(job_id=job_id)))
            elif action == "done":
                client.receive_text(worker.send(JobDone(job_id=job_id, reason="complete")))
            elif action == "error":
                client.receive_text(worker.send(Error(code=ErrorCode.INTERNAL, message="x", job_id=job_id)))
            else:
                client.receive_text(worker.send(JobResult(job_id=job_id, seq=0, data={})))
        except LocalProtocolError:
            pass  # this side refused to send: nothing reached the peer
        assert client.jobs == worker.jobs
