"""Streaming voice activity detection with Silero VAD (the ONNX file inside faster-whisper).

faster-whisper's own wrapper runs whole buffers and resets its state on every
call; a live stream needs the recurrent state (``h``, ``c``) and the 64-sample
context carried from one 512-sample chunk to the next, which is what this does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

CHUNK_SAMPLES = 512  # 32 ms at 16 kHz: the model's frame
CONTEXT_SAMPLES = 64


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

    def __init__(self) -> None:
        self._session = _SharedSession.get()
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)

    def probability(self, chunk: np.ndarray) -> float:
        """Speech probability of the next ``CHUNK_SAMPLES`` int16 samples."""
        audio = chunk.astype(np.float32) / 32768.0
        batch = np.concatenate([self._context, audio])[None, :]
        self._context = audio[-CONTEXT_SAMPLES:]
        prob, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        return float(prob.reshape(-1)[0])
