"""The demo page and the JavaScript SDK in a real headless Chromium (Debian's package).

Chromium is the microphone (a WAV file of a spoken question) and the camera
(its fake device), talks WebRTC to an in-process gateway with the real
workers, and plays the answer. Flags and workarounds: shared/browser-testing.md.
Screenshots go to ``$EDGESTREAM_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from gateway.server import Gateway
from stream.audio import resample, write_wav
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from tests.conftest import wait_until, word_error_rate

QUESTION = "What is the capital of France?"
ARTIFACTS = Path(os.environ.get("EDGESTREAM_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM = os.environ.get("EDGESTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Generous: the machines that run this are small and shared.
TIMEOUT_MS = 30_000

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",  # ICE on a machine with only lo up
]

OpenPage = Callable[..., Awaitable[Page]]


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def playwright():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) or set EDGESTREAM_CHROMIUM")
    async with async_playwright() as playwright:
        yield playwright


@pytest_asyncio.fixture(loop_scope="session")
async def open_page(playwright, tmp_path, monkeypatch) -> AsyncIterator[OpenPage]:
    """Launch Chromium with a WAV as its microphone and open ``url`` in it."""
    contexts: list[BrowserContext] = []
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # Chromium leaves folders in $TMPDIR

    async def open_(url: str, microphone: Path | None = None, grant_media: bool = True, viewport: dict | None = None) -> Page:
        flags = list(FLAGS)
        if microphone is not None:
            flags.append(f"--use-file-for-fake-audio-capture={microphone}")
        if grant_media:
            flags.append("--use-fake-ui-for-media-stream")  # say yes to the permission prompt
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / f"profile-{len(contexts)}",
            executable_path=CHROMIUM,
            headless=True,
            args=flags,
            ignore_default_args=["--mute-audio"],
            viewport=viewport or {"width": 1000, "height": 1000},
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        contexts.append(context)
        page = context.pages[0] if context.pages else await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()


def page_url(gateway: Gateway, query: str = "") -> str:
    return gateway.url.replace("ws://", "http://").replace("/session", "/") + query


@pytest.fixture
def question_wav(speak, tmp_path) -> Path:
    """The question as Chromium's microphone: 48 kHz, leading silence, then a long quiet.

    The fake microphone loops the file from getUserMedia on, so the silence
    covers the time to connect and keeps the question from repeating.
    """
    speech = resample(speak(QUESTION), 16_000, 48_000)
    samples = np.concatenate([np.zeros(48_000 * 2, np.int16), speech, np.zeros(48_000 * 40, np.int16)])
    path = tmp_path / "question.wav"
    write_wav(path, samples, 48_000)
    return path


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


async def test_page_answers_a_spoken_question_with_camera_on(gateway, open_page, question_wav):
    page = await open_page(page_url(gateway), microphone=question_wav)
    await expect(page.locator("#workers li")).to_have_count(4)
    await expect(page.locator('#workers li[data-up="false"]')).to_have_count(0)

    # Keyboard only: camera on, voice processing off (the test checks content), start.
    await page.get_by_role("checkbox", name="Camera").focus()
    await page.keyboard.press("Space")
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("checkbox", name="Echo cancellation")).to_be_focused()
    await page.keyboard.press("Space")
    await page.get_by_role("button", name="Start talking").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_have_text("Listening")
    await expect(page.get_by_role("button", name="Stop")).to_be_focused()
    await expect(page.locator("#camera-card")).to_be_visible()

    # The camera's frames reach the gateway.
    session_id = await page.evaluate("window.edgestreamDemo.session.sessionId")
    await wait_until(lambda: gateway.sessions[session_id].video_frames >= 5, timeout=20)

    # The transcript, then the streamed answer, then the latency panel.
    you = page.locator("#turns li[data-turn='1'] .you:not(.partial)")
    await expect(you).not_to_be_empty(timeout=TIMEOUT_MS)
    assert word_error_rate(QUESTION, await you.inner_text()) <= 0.2
    answer = page.locator("#turns li[data-turn='1'] .answer")
    await expect(answer).to_contain_text("Paris", ignore_case=True, timeout=TIMEOUT_MS)
    rows = page.locator(".latency-turn[data-turn='1'] tr[data-stage]")
    await expect(rows).to_have_count(7, timeout=TIMEOUT_MS)  # six stages and the camera
    for stage, worker in (("Speech to text", "stt@"), ("LLM first token", "llm@"), ("TTS first audio", "tts@")):
        row = page.locator(f".latency-turn[data-turn='1'] tr[data-stage='{stage}']")
        assert (await row.locator(".ms").inner_text()).removesuffix(" ms").isdigit()
        assert (await row.locator(".who").inner_text()).startswith(worker)
    camera_row = page.locator(".latency-turn[data-turn='1'] tr[data-stage='Camera read'] .who")
    assert (await camera_row.inner_text()).startswith("vision@")
    partials = await page.evaluate("window.edgestreamDemo.session.events.filter(e => e.type === 'transcript.partial').length")
    assert partials >= 1

    # The answer audio plays: packets with sound arrive, and the page's analyser hears it.
    async def heard() -> bool:
        stats = await page.evaluate("window.edgestreamDemo.session.stats()")
        peak = float(await page.locator("#level").get_attribute("data-peak") or 0)
        return stats["audioPacketsReceived"] > 50 and peak > 0.01

    await wait_async(heard, timeout=20)
    await page.screenshot(path=screenshot_path("demo-page"), full_page=True)

    await page.keyboard.press("Enter")  # Stop has the focus
    await expect(page.locator("#status")).to_have_text("Idle")
    await wait_until(lambda: session_id not in gateway.sessions, timeout=15)


async def wait_async(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    import asyncio

    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.2)
