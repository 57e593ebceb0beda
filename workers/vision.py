"""Vision: OCR with rapidocr's packaged models, and optionally a short description.

A job is one image (a JPEG, PNG or raw RGB24 frame). The answer is one
``job.result`` with the text lines found (text, score, box) and, when the
worker is configured with a llama.cpp vision-language model and its mmproj,
a one-sentence description.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from stream.config import VisionSettings
from stream.protocol import ErrorCode, MediaFormat, MediaFrame, ProtocolError, WorkerKind
from stream.protocol.frames import IMAGE_FORMATS
from stream.protocol.jobs import OcrLine, VisionParams, VisionResult

from .engine import Engine
from .job import Job
from .model_files import ModelFile

MAX_PIXELS = 3840 * 2160
"""A 4K frame; decoding one costs ~100 MB and OCR a few seconds on two cores (16.7 MP cost 635 MB)."""
MAX_ASPECT = 20
"""Longest side over shortest: a 1 x 16,777,216 strip is no picture (and broke OCR with an internal error)."""


def check_size(width: int, height: int, job_id: int) -> None:
    """Refuse, before decoding, an image too large or too thin to be a camera frame."""
    if width * height > MAX_PIXELS:
        raise ProtocolError(ErrorCode.LIMIT, f"image of {width}x{height} pixels is too large (at most {MAX_PIXELS} pixels)", job_id)
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ProtocolError(ErrorCode.LIMIT, f"image of {width}x{height} pixels is too thin (sides at most {MAX_ASPECT}:1)", job_id)


def decode_image(frame: MediaFrame, params: VisionParams) -> Image.Image:
    """The frame as an RGB image, or a protocol error saying what is wrong with it (blocking:
    decoding a large frame takes a second; call it in a thread)."""
    if frame.format not in IMAGE_FORMATS:
        raise ProtocolError(ErrorCode.BAD_FORMAT, f"vision jobs take JPEG, PNG or RGB24 frames, not {frame.format.name}", frame.job_id)
    if frame.format is MediaFormat.RGB24:
        if params.width is None or params.height is None:
            raise ProtocolError(ErrorCode.BAD_PARAMS, "RGB24 frames need width and height in the job params", frame.job_id)
        expected = params.width * params.height * 3
        if len(frame.payload) != expected:
            raise ProtocolError(ErrorCode.BAD_FORMAT, f"RGB24 {params.width}x{params.height} needs {expected} bytes, got {len(frame.payload)}", frame.job_id)
        check_size(params.width, params.height, frame.job_id)
        pixels = np.frombuffer(frame.payload, np.uint8).reshape(params.height, params.width, 3)
        return Image.fromarray(pixels, "RGB")
    try:
        image = Image.open(io.BytesIO(frame.payload))  # reads the header only
        check_size(image.width, image.height, frame.job_id)
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError(ErrorCode.BAD_FORMAT, f"cannot decode {frame.format.name} image: {exc}", frame.job_id) from None


class VisionEngine(Engine):
    kind = WorkerKind.VISION
    rate_unit = "frames"

    def __init__(self, model: ModelFile, settings: VisionSettings) -> None:
        super().__init__(model)
        from rapidocr import RapidOCR  # heavy import, only on vision workers

        self.settings = settings
        ocr_params = {
            "Global.log_level": "warning",
            "EngineConfig.onnxruntime.intra_op_num_threads": settings.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        self._ocr_pool: asyncio.Queue[Any] | None = None
        self._ocrs = [RapidOCR(params=ocr_params) for _ in range(settings.capacity)]
        self._describer = Describer(settings) if settings.mmproj and settings.vlm_model else None
        self._pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="vision")

    def analyze(self, ocr: Any, image: Image.Image, params: VisionParams) -> VisionResult:
        """OCR (and describe) one image (blocking)."""
        output = ocr(image)
        lines = []
        if output.txts:
            for text, score, box in zip(output.txts, output.scores, output.boxes, strict=True):
                lines.append(OcrLine(text=text, score=round(float(score), 4), box=[(float(x), float(y)) for x, y in box]))
        description = self._describer.describe(image, params.prompt) if self._describer and params.describe else None
        return VisionResult(lines=lines, description=description)

    async def run(self, job: Job) -> None:
        params: VisionParams = job.params
        image: Image.Image | None = None
        while (item := await job.next_input()) is not None:
            if not isinstance(item, MediaFrame):
                raise ProtocolError(ErrorCode.BAD_FORMAT, "vision jobs take one image frame, not text", job.job_id)
            if image is not None:
                raise ProtocolError(ErrorCode.LIMIT, "a vision job takes one image", job.job_id)
            image = await asyncio.get_running_loop().run_in_executor(self._pool, decode_image, item, params)
        if image is None:
            raise ProtocolError(ErrorCode.BAD_PARAMS, "job.end before any image", job.job_id)
        if self._ocr_pool is None:
            self._ocr_pool = asyncio.Queue()
            for ocr in self._ocrs:
                self._ocr_pool.put_nowait(ocr)
        ocr = await self._ocr_pool.get()
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self.analyze, ocr, image, params)
        finally:
            self._ocr_pool.put_nowait(ocr)
        elapsed = time.perf_counter() - started
        job.count(1, elapsed)
        job.stats["ms"] = round(elapsed * 1000, 1)
        await job.emit(result.model_dump())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # work still running must not lose its model


class Describer:
    """A llama.cpp vision-language model (GGUF + mmproj) that describes an image."""

    def __init__(self, settings: VisionSettings) -> None:
        from llama_cpp import Llama, llama_chat_format

        handler_type = getattr(llama_chat_format, "MTMDChatHandler", llama_chat_format.Llava15ChatHandler)
        self._llm = Llama(
            model_path=settings.vlm_model,
            chat_handler=handler_type(clip_model_path=settings.mmproj, verbose=False),
            n_ctx=4096,
            n_threads=settings.threads,
            verbose=False,
        )

    def describe(self, image: Image.Image, prompt: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        answer = self._llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}],
            max_tokens=48,
            temperature=0.2,
        )
        return answer["choices"][0]["message"]["content"].strip()
