"""The answer track's packets (DTX between answers) and the ingest clock, without a network."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.playout import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    TALKSPURT_BURST,
    TRAILING_SILENT_PACKETS,
    AnswerTrack,
)
from stream.audio import ArrivalLag, silent_opus_packet


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


async def talkspurt(track: AnswerTrack, turn: int, frames: int) -> list[int]:
    """Play ``frames`` of answer audio; the pts of its packets, once the trailing silence is sent."""
    quiet = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.15)
    assert not quiet.done()  # nothing to say: no packet at all, not even silence
    track.write(turn, 0, tone(frames * FRAME_SAMPLES / SAMPLE_RATE))
    packet = await asyncio.wait_for(quiet, 0.2)  # woken by the audio (bench overhead times how soon)
    pts = [packet.pts]
    assert bytes(packet) != silent_opus_packet()
    for _ in range(frames - 1):
        packet = await asyncio.wait_for(track.recv(), 0.5)
        assert bytes(packet) != silent_opus_packet()
        pts.append(packet.pts)
    for _ in range(TRAILING_SILENT_PACKETS):  # the talkspurt ends on silence
        assert bytes(await asyncio.wait_for(track.recv(), 0.5)) == silent_opus_packet()
    return pts


async def test_nothing_is_sent_between_answers_and_an_answer_starts_at_once():
    started: list[int] = []
    idle: list[int] = []
    track = AnswerTrack(on_piece_started=lambda turn, piece, at: started.append(turn), on_idle=idle.append)
    first = await talkspurt(track, 1, 5)
    second = await talkspurt(track, 2, 5)
    assert started == [1, 2] and idle == [1, 2]
    # Paced one frame apart within a talkspurt; across the quiet time the timestamps jump by it.
    assert np.diff(first).tolist() == np.diff(second).tolist() == [FRAME_SAMPLES] * 4
    assert second[0] - first[-1] >= TRAILING_SILENT_PACKETS * FRAME_SAMPLES + int(0.15 * SAMPLE_RATE)
    after = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.1)
    assert not after.done()
    after.cancel()


async def test_an_answer_starts_with_a_burst_of_frames_then_goes_at_the_pace_of_real_time():
    """A receiver holding four frames back (aiortc's jitter buffer) plays the first at once."""
    track = AnswerTrack()
    quiet = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.05)
    track.write(1, 0, tone(0.5))
    due = [((await asyncio.wait_for(quiet, 0.5)).pts, track._clock.due)]
    for _ in range(TALKSPURT_BURST + 2):
        packet = await asyncio.wait_for(track.recv(), 0.5)
        due.append((packet.pts, track._clock.due))
    start = due[0][1]
    assert all(at <= start for _, at in due[:TALKSPURT_BURST])  # sent together
    assert due[TALKSPURT_BURST][1] == pytest.approx(start + 0.02, abs=1e-6)  # then one frame per 20 ms
    assert due[TALKSPURT_BURST + 1][1] == pytest.approx(start + 0.04, abs=1e-6)
    assert [pts for pts, _ in due] == [due[0][0] + i * FRAME_SAMPLES for i in range(len(due))]  # timestamps as ever
    # Too little audio for a whole burst: only what there is goes at once.
    short = AnswerTrack()
    quiet = asyncio.ensure_future(short.recv())
    await asyncio.sleep(0.05)
    short.write(1, 0, tone(0.05))  # two and a half frames
    await asyncio.wait_for(quiet, 0.5)
    first = short._clock.due
    await asyncio.wait_for(short.recv(), 0.5)
    assert short._clock.due == pytest.approx(first, abs=1e-6)  # the second whole frame went with the first
    await asyncio.wait_for(short.recv(), 0.5)  # the half frame: paced
    assert short._clock.due == pytest.approx(first + 0.02, abs=1e-6)


async def test_barge_in_stops_within_a_frame():
    track = AnswerTrack()
    track.write(1, 0, tone(2.0))
    assert bytes(await track.recv()) != silent_opus_packet()
    track.stop()
    assert not track.playing
    assert bytes(await asyncio.wait_for(track.recv(), 0.5)) == silent_opus_packet()


async def test_each_piece_is_announced_as_it_starts_and_a_retracted_piece_is_not_played():
    started: list[tuple[int, int]] = []
    track = AnswerTrack(on_piece_started=lambda turn, piece, at: started.append((turn, piece)))
    frame = FRAME_SAMPLES / SAMPLE_RATE
    track.write(3, 0, tone(2 * frame))
    track.write(3, 1, tone(2 * frame))
    track.write(3, 2, tone(2 * frame))
    track.retract(3, 1)  # its TTS worker was lost: it will be synthesized again
    assert track.buffered_s == pytest.approx(4 * frame)
    for _ in range(4):
        await asyncio.wait_for(track.recv(), 0.5)
    assert started == [(3, 0), (3, 2)]


def test_audio_beyond_the_limit_is_dropped_and_counted():
    from gateway.playout import MAX_BUFFERED_S

    track = AnswerTrack()
    track.write(1, 0, np.zeros(int(MAX_BUFFERED_S * SAMPLE_RATE), np.int16))
    track.write(1, 1, tone(1.0))
    assert track.buffered_s == pytest.approx(MAX_BUFFERED_S) and track.dropped_s == pytest.approx(1.0)


@pytest.mark.parametrize("late_s", [0.0, 0.012, 0.05])
def test_arrival_lag_is_lateness_against_the_media_clock(late_s):
    clock = ArrivalLag()
    start = 100.0
    for i in range(10):  # on time, 20 ms apart
        assert clock.arrived(i * 960, 960, 48_000, start + i * 0.02) == (pytest.approx(0.0, abs=1e-9), 0)
    lag, lost = clock.arrived(10 * 960, 960, 48_000, start + 0.2 + late_s)
    assert lag == pytest.approx(late_s) and lost == 0


def test_arrival_gaps_count_lost_frames():
    clock = ArrivalLag()
    clock.arrived(0, 960, 48_000, 0.0)
    assert clock.arrived(960 * 4, 960, 48_000, 0.08)[1] == 3  # frames 1-3 never came
