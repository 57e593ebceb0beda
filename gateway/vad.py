"""Streaming voice activity detection with Silero VAD (the ONNX file inside faster-whisper).

faster-whisper's own wrapper runs whole buffers and resets its state on every
call; a live stream needs the recurrent state (``h``, ``c``) and the 64-sample
context carried from one 512-sample chunk to the next, which is what this does.

Most of what a session hears is silence (the person listens to the answer,
thinks, the room is quiet), and one Silero call costs ~60-100 us a chunk. Out
of a turn, a chunk quieter than ``SILENCE_DBFS`` (RMS, ~2 us to measure) is
called silence without asking the model; the first chunk above it goes to the
model as before, so speech onset is caught in the same chunk. In a turn every
chunk goes to the model: a quiet speaker's trailing sounds must not end it
early (``tests/test_turns.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

CHUNK_SAMPLES = 512  # 32 ms at 16 kHz: the model's frame
CONTEXT_SAMPLES = 64
SILENCE_DBFS = -55.0
"""Chunks quieter than this (RMS, dB below full scale) are silence without the model: below
any voice at a microphone (speech is -40 to -10 dBFS), above digital and most room silence."""
_SILENCE_POWER = (32768.0 * 10 ** (SILENCE_DBFS / 20)) ** 2 * CHUNK_SAMPLES
"""The same as the sum of squared int16 samples of a chunk."""


def silero_model_path() -> Path:
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"


class _SharedSession:
    """One ONNX session for every stream in the process (the weights are read-only)."""

    _session: onnxruntime.InferenceSession | None = None

    @classmethod
    def get(cls) -> onnxruntime.InferenceSession:
        if cls._session is None:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            cls._session = onnxruntime.InferenceSession(str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"])
        return cls._session


class StreamingVad:
    """Speech probability for each 32 ms chunk of one 16 kHz mono stream."""

    def __init__(self, gate: bool = True) -> None:
        self.gate = gate
        """Whether chunks under ``SILENCE_DBFS`` skip the model."""
        self.gated = 0
        """Chunks the gate called silence."""
        self._session = _SharedSession.get()
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)

    def probability(self, chunk: np.ndarray, may_gate: bool = True) -> float:
        """Speech probability of the next ``CHUNK_SAMPLES`` int16 samples (0.0 under the energy gate, where ``may_gate``)."""
        audio = chunk.astype(np.float32)
        if self.gate and may_gate and float(np.dot(audio, audio)) < _SILENCE_POWER:
            self._context = audio[-CONTEXT_SAMPLES:] / 32768.0
            self.gated += 1
            return 0.0
        audio /= 32768.0
        batch = np.concatenate([self._context, audio])[None, :]
        self._context = audio[-CONTEXT_SAMPLES:]
        prob, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        return float(prob.reshape(-1)[0])
