"""The sans-I/O codec: every valid message round-trips; no input raises anything but ProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.protocol import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    Error,
    ErrorCode,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    Limits,
    LoadReport,
    LoadRequest,
    MediaFormat,
    MediaFrame,
    ProtocolError,
    WorkerKind,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)

job_ids = st.integers(1, 2**32 - 1)
seqs = st.integers(0, 2**32 - 1)
text = st.text(max_size=64)
short = st.text(max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short, inner, max_size=4), max_leaves=12)
json_objects = st.dictionaries(short, json_values, max_size=5)
kinds = st.sampled_from(list(WorkerKind))
finite = st.floats(0, 1e9, allow_nan=False)

messages = st.one_of(
    st.builds(
        Hello,
        worker_id=short,
        kind=kinds,
        model_id=short,
        model_sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
        capacity=st.integers(1, 1024),
        software=short,
        max_text_bytes=st.integers(1, 2**31),
        max_frame_bytes=st.integers(1, 2**31),
    ),
    st.builds(JobStart, job_id=job_ids, kind=kinds, params=json_objects),
    st.builds(JobText, job_id=job_ids, seq=seqs, text=text),
    st.builds(JobFlush, job_id=job_ids),
    st.builds(JobEnd, job_id=job_ids),
    st.builds(JobCancel, job_id=job_ids),
    st.builds(JobResult, job_id=job_ids, seq=seqs, data=json_objects),
    st.builds(JobDone, job_id=job_ids, reason=st.sampled_from(["complete", "cancelled"]), stats=st.dictionaries(short, finite, max_size=4)),
    st.builds(Error, code=st.sampled_from(list(ErrorCode)), message=st.text(max_size=200), job_id=st.none() | job_ids),
    st.just(LoadRequest()),
    st.builds(
        LoadReport,
        running=st.integers(0, 1000),
        queued=st.integers(0, 1000),
        capacity=st.integers(1, 1000),
        service_rate=finite,
        rate_unit=short,
        jobs_completed=st.integers(0, 2**40),
    ),
)

frames = st.builds(
    MediaFrame,
    job_id=job_ids,
    seq=seqs,
    format=st.sampled_from([MediaFormat.JPEG, MediaFormat.PNG, MediaFormat.RGB24]),
    payload=st.binary(max_size=256),
) | st.builds(
    lambda job_id, seq, channels, rate, samples: MediaFrame(job_id, seq, MediaFormat.PCM_S16LE, samples * 2 * channels, channels, rate),
    job_ids,
    seqs,
    st.integers(1, 8),
    st.integers(1, 2**32 - 1),
    st.binary(min_size=0, max_size=64).map(lambda b: b[: len(b) // 2 * 2] or b"\0\0"),
)


@given(messages)
def test_every_valid_message_round_trips(message):
    assert decode_message(encode_message(message)) == message


@given(frames)
def test_every_valid_frame_round_trips(frame):
    assert decode_frame(encode_frame(frame), DEFAULT_LIMITS.max_frame_bytes) == frame


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | st.text(max_size=512))
def test_arbitrary_text_frames_raise_only_protocol_errors(data):
    try:
        decode_message(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@settings(max_examples=400)
@given(st.binary(max_size=512))
def test_arbitrary_binary_frames_raise_only_protocol_errors(data):
    try:
        frame = decode_frame(data, 4096)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert encode_frame(frame) == data


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "type", "job_id", "seq", "kind", "params", "text", "data", "code", "message", "reason"]), json_values))
def test_json_objects_with_protocol_keys_raise_only_protocol_errors(obj):
    try:
        decode_message(json.dumps(obj))
    except ProtocolError:
        pass


def _code(text_or_bytes, limits=DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_message(text_or_bytes, limits)
    return info.value.code


def test_decoding_errors_carry_the_right_code():
    assert _code(b"\xff\xfe garbage") is ErrorCode.MALFORMED
    assert _code("not json") is ErrorCode.MALFORMED
    assert _code("[1, 2]") is ErrorCode.MALFORMED
    assert _code('{"type": "job.end", "job_id": 1}') is ErrorCode.BAD_VERSION
    assert _code('{"v": 2, "type": "job.end", "job_id": 1}') is ErrorCode.BAD_VERSION
    assert _code('{"v": 1, "type": "job.explode", "job_id": 1}') is ErrorCode.UNKNOWN_TYPE
    assert _code('{"v": 1, "type": "job.end", "job_id": 0}') is ErrorCode.MALFORMED
    assert _code('{"v": 1, "type": "job.end", "job_id": 1, "extra": true}') is ErrorCode.MALFORMED
    assert _code("[" * 100_000) is ErrorCode.MALFORMED
    big = json.dumps({"v": 1, "type": "job.text", "job_id": 1, "seq": 0, "text": "x" * 2000})
    assert _code(big, Limits(max_text_bytes=1000)) is ErrorCode.TOO_LARGE


def test_malformed_message_names_the_field_and_the_job():
    with pytest.raises(ProtocolError) as info:
        decode_message('{"v": 1, "type": "job.text", "job_id": 7, "seq": -1, "text": "hi"}')
    assert info.value.code is ErrorCode.MALFORMED
    assert "seq" in info.value.message
    assert info.value.job_id == 7


def test_binary_frame_errors():
    good = encode_frame(MediaFrame(3, 0, MediaFormat.PCM_S16LE, b"\0\0" * 10, 1, 16000))
    with pytest.raises(ProtocolError) as info:
        decode_frame(good[: HEADER_SIZE - 1], 4096)
    assert info.value.code is ErrorCode.MALFORMED
    with pytest.raises(ProtocolError) as info:
        decode_frame(good, len(good) - 1)
    assert info.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        decode_frame(bytes([2]) + good[1:], 4096)
    assert info.value.code is ErrorCode.BAD_VERSION
    with pytest.raises(ProtocolError) as info:
        decode_frame(good[:1] + bytes([99]) + good[2:], 4096)
    assert info.value.code is ErrorCode.BAD_FORMAT and info.value.job_id == 3
    with pytest.raises(ProtocolError) as info:
        decode_frame(good + b"\0", 4096)  # half a sample
    assert info.value.code is ErrorCode.BAD_FORMAT


def test_header_is_sixteen_bytes_and_big_endian():
    data = encode_frame(MediaFrame(0x01020304, 5, MediaFormat.PCM_S16LE, b"", 1, 16000))
    assert HEADER_SIZE == 16
    assert data[:16] == bytes([1, 1, 0, 1, 1, 2, 3, 4, 0, 0, 0, 5, 0, 0, 0x3E, 0x80])
