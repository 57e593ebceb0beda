"""Turn detection (Silero VAD + the turn policy) on piper speech, without any network."""

from __future__ import annotations

import numpy as np

from gateway.turns import SpeechAudio, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, TurnDetector, TurnSettings


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(16000 * seconds), np.int16)


def run(detector: TurnDetector, signal: np.ndarray, piece: int = 320) -> list:
    events = []
    for start in range(0, len(signal), piece):
        events += detector.push(signal[start : start + piece])
    return events


def test_one_utterance_is_one_turn_with_every_sample_passed_on(speak):
    speech = speak("Please turn on the kitchen lights.")
    events = run(TurnDetector(), np.concatenate([silence(0.5), speech, silence(0.6)]))
    kinds = [type(e) for e in events if not isinstance(e, SpeechAudio)]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechEnded]
    started = events[0]
    assert 0.3 <= started.stream_s <= 0.7
    passed = len(started.preroll) + sum(len(e.samples) for e in events if isinstance(e, SpeechAudio))
    assert passed >= len(speech)  # nothing of the utterance is lost
    ended = next(e for e in events if isinstance(e, SpeechEnded))
    assert abs(ended.speech_end_s - (0.5 + len(speech) / 16000)) < 0.35
    assert 0.28 <= ended.stream_s - ended.speech_end_s <= 0.4  # the configured 320 ms of silence


def test_a_short_pause_resumes_the_same_turn(speak):
    first, second = speak("Please turn on the kitchen lights."), speak("And close the door.")
    events = run(TurnDetector(TurnSettings(pause_ms=160, end_silence_ms=600)), np.concatenate([silence(0.3), first, silence(0.35), second, silence(0.9)]))
    kinds = [type(e) for e in events if not isinstance(e, SpeechAudio)]
    assert kinds.count(SpeechStarted) == 1 and kinds.count(SpeechEnded) == 1
    assert SpeechResumed in kinds and kinds.index(SpeechPaused) < kinds.index(SpeechResumed)


def test_silence_and_noise_floor_start_no_turn():
    rng = np.random.default_rng(1)
    noise = (rng.normal(0, 30, 16000 * 2)).astype(np.int16)  # a quiet room
    assert run(TurnDetector(), np.concatenate([silence(1), noise])) == []


def _quiet_room(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 30, int(16000 * seconds)).astype(np.int16)  # about -61 dBFS


def test_the_energy_gate_skips_silence_and_hears_speech_start_in_the_same_chunk(speak):
    from gateway.harness.speech import espeak
    from gateway.vad import StreamingVad

    voices = [
        speak("Please turn on the kitchen lights."),
        espeak("How far is the nearest train station?", "en-us"),
        espeak("Tell me a joke.", "en-gb-scotland"),
    ]
    for seed, speech in enumerate(voices):
        for loudness in (1.0, 0.1):  # as spoken, and a quiet speaker 20 dB down
            signal = np.concatenate([_quiet_room(1.0, seed), (speech * loudness).astype(np.int16), _quiet_room(1.2, seed + 10)])
            gated_vad, plain_vad = StreamingVad(gate=True), StreamingVad(gate=False)
            gated = [e for e in run(TurnDetector(vad=gated_vad), signal) if not isinstance(e, SpeechAudio)]
            plain = [e for e in run(TurnDetector(vad=plain_vad), signal) if not isinstance(e, SpeechAudio)]
            assert [type(e) for e in gated] == [type(e) for e in plain], (seed, loudness)
            assert abs(gated[0].stream_s - plain[0].stream_s) <= 0.033  # onset within one chunk
            assert abs(gated[-1].stream_s - plain[-1].stream_s) <= 0.033
            silent_chunks = int(1.6 * 16000 / 512)  # out of the turn: the second before it and what follows its end
            assert gated_vad.gated >= 0.8 * silent_chunks and plain_vad.gated == 0
