"""The vision worker: OCR with rapidocr's packaged models on rendered signs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stream.protocol import MediaFormat, WorkerKind
from stream.worker_client import JobFailed
from workers.samples import sign_image

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier


sign = sign_image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "RGB24"])
async def test_reads_a_rendered_sign(start_worker, connect, fmt):
    _, url = await start_worker(WorkerKind.VISION, capacity=1)
    vision = await connect(url)
    image = sign("EXIT GATE 7")
    if fmt == "RGB24":
        result = await vision.analyze_image(np.asarray(image).tobytes(), MediaFormat.RGB24, width=640, height=360)
    else:
        result = await vision.analyze_image(encoded(image, fmt), MediaFormat[fmt])
    assert "EXITGATE7" in result.text.replace(" ", "").upper()
    line = result.lines[0]
    assert line.score > 0.5 and len(line.box) == 4
    xs = [x for x, _ in line.box]
    assert 30 <= min(xs) < max(xs) <= 610  # the box is where the text was drawn
    assert result.description is None  # no vision-language model configured


async def test_an_image_without_text_gives_no_lines(start_worker, connect):
    _, url = await start_worker(WorkerKind.VISION, capacity=1)
    vision = await connect(url)
    result = await vision.analyze_image(encoded(Image.new("RGB", (320, 240), "gray"), "PNG"), MediaFormat.PNG)
    assert result.lines == []


@pytest.mark.parametrize(
    ("payload", "fmt", "params", "code"),
    [
        (b"\x89PNG\r\n\x1a\n not really", MediaFormat.PNG, {}, "bad_format"),
        (b"\0" * 30, MediaFormat.RGB24, {"width": 4, "height": 4}, "bad_format"),
        (b"\0" * 48, MediaFormat.RGB24, {}, "bad_params"),
        (encoded(Image.new("L", (20_000, 1)), "PNG"), MediaFormat.PNG, {}, "limit"),
        (encoded(Image.new("L", (4000, 3000)), "PNG"), MediaFormat.PNG, {}, "limit"),
        (b"\0" * (3 * 5000 * 100), MediaFormat.RGB24, {"width": 5000, "height": 100}, "limit"),
    ],
    ids=["broken-png", "rgb24-wrong-size", "rgb24-without-size", "a-strip", "12-megapixels", "rgb24-strip"],
)
async def test_bad_images_fail_only_their_job(start_worker, connect, payload, fmt, params, code):
    _, url = await start_worker(WorkerKind.VISION, capacity=1)
    vision = await connect(url)
    with pytest.raises(JobFailed) as info:
        await vision.analyze_image(payload, fmt, **params)
    assert info.value.code.value == code
    result = await vision.analyze_image(encoded(sign("OPEN"), "PNG"), MediaFormat.PNG)
    assert "OPEN" in result.text.upper()
