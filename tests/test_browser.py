"""The demo page and the JavaScript SDK in a real headless Chromium (Debian's package).

Chromium is the microphone (a WAV file of a spoken question) and the camera
(its fake device), talks WebRTC to an in-process gateway with the real
workers, and plays the answer. The flags below make it work headless, as root, on a box with no camera.
Screenshots go to ``$EDGESTREAM_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from gateway.harness.figures import free_port
from gateway.server import Gateway
from stream.audio import resample, write_wav
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from tests.conftest import wait_until, word_error_rate

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier

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

    async def open_(
        url: str, microphone: Path | None = None, grant_media: bool = True, viewport: dict | None = None, trust_any_certificate: bool = False
    ) -> Page:
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
            ignore_https_errors=trust_any_certificate,  # a LAN's self-signed certificate
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
    await expect(page.locator('#workers li[data-state="ready"]')).to_have_count(4)

    # Keyboard only: camera on, voice processing off (the test checks content), start.
    await page.get_by_role("checkbox", name="Camera").focus()
    await page.keyboard.press("Space")
    await page.get_by_role("checkbox", name="Echo cancellation").focus()
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
    # What the small model answers varies (the camera's text is in its prompt); that it streams does not.
    done = await page.evaluate("window.edgestreamDemo.session.waitEvent('answer.done', {match: {turn: 1}})")
    answer = page.locator("#turns li[data-turn='1'] .answer")
    await expect(answer).to_have_text(done["text"].strip())
    assert done["text"].strip()
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
    await expect(page.locator("#status")).to_have_text("Listening")  # the answer has played
    # The turn as the person saw it: listening, then thinking, then speaking, then listening again.
    assert in_order(await page.evaluate("window.edgestreamDemo.states"), ["listening", "thinking", "speaking", "listening"])
    # The microphone meter heard the question.
    assert float(await page.locator("#mic-level").get_attribute("data-peak") or 0) > 0.01
    await page.screenshot(path=screenshot_path("demo-page"), full_page=True)

    await page.keyboard.press("Enter")  # Stop has the focus
    await expect(page.locator("#status")).to_have_text("Idle")
    await wait_until(lambda: session_id not in gateway.sessions, timeout=15)


@pytest.fixture
def silent_wav(tmp_path) -> Path:
    """A quiet microphone (Chromium's own fake one beeps, which could start turns)."""
    path = tmp_path / "silence.wav"
    write_wav(path, np.zeros(48_000 * 30, np.int16), 48_000)
    return path


async def start_talking(page: Page) -> None:
    await page.get_by_role("button", name="Start talking").click()
    await expect(page.locator("#status")).to_have_text("Listening")


async def type_question(page: Page, question: str, turn: int = 1) -> dict:
    """Type ``question`` on the page and send it with Enter; the ``answer.done`` of its turn."""
    box = page.get_by_role("textbox", name="Type a question")
    await box.fill(question)
    await box.press("Enter")
    await expect(box).to_have_value("")
    return await page.evaluate(f"window.edgestreamDemo.session.waitEvent('answer.done', {{match: {{turn: {turn}}}, timeoutMs: 60000}})")


async def test_a_typed_question_is_answered_in_text_and_speech(gateway, open_page, silent_wav):
    page = await open_page(page_url(gateway), microphone=silent_wav)
    await start_talking(page)
    question = "What is the capital of France?"
    done = await type_question(page, question)
    turn = page.locator("#turns li.turn[data-turn='1']")
    await expect(turn.locator(".you")).to_have_text(question)
    await expect(turn.locator(".answer")).to_have_text(done["text"].strip())
    assert done["text"].strip() and not done["interrupted"]
    # Spoken too: answer audio with sound reached the page.
    peak = float(await page.locator("#level").get_attribute("data-peak") or 0)
    stats = await page.evaluate("window.edgestreamDemo.session.stats()")
    assert peak > 0.01 and stats["audioPacketsReceived"] > 20, (peak, stats)
    assert in_order(await page.evaluate("window.edgestreamDemo.states"), ["listening", "thinking", "speaking", "listening"])
    who = page.locator(".latency-turn[data-turn='1'] tr[data-stage='Speech to text'] .who")
    await expect(who).to_have_text("typed")
    # Screen readers are told the final text only, not every token.
    await expect(page.locator("#announcer")).to_have_text(f"Answer: {done['text'].strip()}")
    assert await page.locator("#turns").get_attribute("aria-live") is None


async def test_stop_then_start_keeps_both_sessions_turns_apart(gateway, open_page, silent_wav):
    page = await open_page(page_url(gateway), microphone=silent_wav)
    await start_talking(page)
    first_session = await page.evaluate("window.edgestreamDemo.session.sessionId")
    await type_question(page, "What is the capital of France?")
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#status")).to_have_text("Idle")
    await start_talking(page)
    second_session = await page.evaluate("window.edgestreamDemo.session.sessionId")
    assert second_session != first_session
    await type_question(page, "What is the capital of Italy?")  # turn 1 of the new session
    turns = page.locator("#turns li.turn[data-turn='1']")
    await expect(turns).to_have_count(2)
    assert [await t.get_attribute("data-session") for t in await turns.all()] == [first_session, second_session]
    await expect(turns.nth(0).locator(".you")).to_have_text("What is the capital of France?")
    await expect(turns.nth(1).locator(".you")).to_have_text("What is the capital of Italy?")
    # A divider between them says a new session began.
    items = await page.locator("#turns > li").evaluate_all("items => items.map(i => i.className)")
    assert items == ["turn", "divider", "turn"], items
    # Each session's turn 1 has its own latency chart.
    charts = page.locator(".latency-turn[data-turn='1']")
    await expect(charts).to_have_count(2)
    assert {await c.get_attribute("data-session") for c in await charts.all()} == {first_session, second_session}


async def test_the_camera_toggles_mid_session(bare_gateway, open_page, silent_wav):
    page = await open_page(page_url(bare_gateway), microphone=silent_wav)
    await start_talking(page)
    session_id = await page.evaluate("window.edgestreamDemo.session.sessionId")
    session = bare_gateway.sessions[session_id]
    await expect(page.locator("#camera-card")).to_be_hidden()
    video_senders = "window.edgestreamDemo.session.pc.getSenders().filter(s => s.track && s.track.kind === 'video').length"
    assert await page.evaluate(video_senders) == 0

    await page.get_by_role("checkbox", name="Camera").check()
    await expect(page.locator("#camera-card")).to_be_visible()
    await wait_until(lambda: session.video_frames >= 5, timeout=20)  # no renegotiation: the same session
    assert await page.evaluate(video_senders) == 1

    await page.get_by_role("checkbox", name="Camera").uncheck()
    await expect(page.locator("#camera-card")).to_be_hidden()
    assert await page.evaluate(video_senders) == 0
    assert await page.evaluate("document.getElementById('preview').srcObject") is None

    # Off after Stop too: no black preview left behind.
    await page.get_by_role("checkbox", name="Camera").check()
    await expect(page.locator("#camera-card")).to_be_visible()
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#camera-card")).to_be_hidden()
    assert await page.evaluate("document.getElementById('preview').srcObject") is None


async def test_mute_and_push_to_talk_gate_the_microphone(bare_gateway, open_page, silent_wav):
    page = await open_page(page_url(bare_gateway), microphone=silent_wav)
    await start_talking(page)
    sending = "window.edgestreamDemo.microphone.enabled"
    assert await page.evaluate(sending)
    mute = page.get_by_role("button", name="Mute")
    await mute.click()
    await expect(page.get_by_role("button", name="Unmute")).to_have_attribute("aria-pressed", "true")
    assert not await page.evaluate(sending)
    await page.get_by_role("button", name="Unmute").click()
    assert await page.evaluate(sending)
    # Push to talk: the microphone is sent only while the button is held (pointer or keyboard).
    await page.get_by_role("checkbox", name="Push to talk").check()
    await expect(page.get_by_role("button", name="Hold to talk")).to_be_visible()
    talk = page.locator("#talk")  # its name changes while held
    assert not await page.evaluate(sending)
    await talk.focus()
    await page.keyboard.down("Space")
    assert await page.evaluate(sending)
    await page.keyboard.up("Space")
    assert not await page.evaluate(sending)
    await talk.dispatch_event("pointerdown")
    assert await page.evaluate(sending)
    await talk.dispatch_event("pointerup")
    assert not await page.evaluate(sending)
    await page.get_by_role("checkbox", name="Push to talk").uncheck()
    assert await page.evaluate(sending)


async def test_a_missing_worker_says_starting_and_its_error_clears_once_it_is_back(workers, open_page, silent_wav):
    from gateway.harness.delay_relay import start_relay

    _, urls = workers
    llm_port = free_port()
    real_llm = urls[WorkerKind.LLM][0].removeprefix("ws://")
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {**urls, WorkerKind.LLM: [f"ws://127.0.0.1:{llm_port}"]})
    port = await gateway.start("127.0.0.1", 0)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    relay = None
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.TTS], timeout=10)
        page = await open_page(page_url(gateway), microphone=silent_wav)
        # Nothing listens on its port yet: as while a worker loads its model.
        await expect(page.locator('#workers li[data-kind="llm"]')).to_have_text("language model: starting…")
        await start_talking(page)
        await page.get_by_role("textbox", name="Type a question").fill("What is the capital of France?")
        await page.get_by_role("button", name="Send").click()
        await expect(page.locator("#errors")).to_contain_text("No language model worker is available")
        await expect(page.locator("#status")).to_have_text("Listening")
        await page.screenshot(path=screenshot_path("worker-missing"), full_page=True)

        # The worker comes up on that port (a relay to a real one): the chip and the error follow.
        host, _, target_port = real_llm.rpartition(":")
        relay = await start_relay("127.0.0.1", llm_port, host, int(target_port), 0.0)
        await expect(page.locator('#workers li[data-kind="llm"]')).to_have_text("language model: ready", timeout=30_000)
        await expect(page.locator("#errors .error")).to_have_count(0)
        done = await type_question(page, "What is the capital of Italy?", turn=2)
        assert done["text"].strip()
    finally:
        if relay is not None:
            relay.close()
        await gateway.close()


def in_order(seen: list[str], expected: list[str]) -> bool:
    """Whether ``expected`` is a subsequence of ``seen``."""
    rest = iter(seen)
    return all(state in rest for state in expected)


async def wait_async(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    import asyncio

    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="session")
async def bare_gateway() -> AsyncIterator[Gateway]:
    """A gateway with no workers: it serves the page and takes sessions."""
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {})
    port = await gateway.start("127.0.0.1", 0)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    yield gateway
    await gateway.close()


# -- error states: each is said plainly, and the page can start again ----------------------


async def test_denied_microphone_is_explained(bare_gateway, open_page):
    page = await open_page(page_url(bare_gateway), grant_media=False)  # headless Chromium denies the prompt
    await page.get_by_role("button", name="Start talking").click()
    await expect(page.locator("#errors")).to_contain_text("Permission to use the microphone was denied")
    await expect(page.locator("#status")).to_have_text("Not connected")
    await expect(page.get_by_role("button", name="Start talking")).to_be_enabled()
    assert not bare_gateway.sessions


async def test_unreachable_gateway_is_explained(bare_gateway, open_page, question_wav):
    nowhere = f"ws://127.0.0.1:{free_port()}/session"
    page = await open_page(page_url(bare_gateway, f"?gateway={nowhere}"), microphone=question_wav)
    await expect(page.locator("#workers")).to_contain_text("gateway: unreachable")
    await page.get_by_role("button", name="Start talking").click()
    await expect(page.locator("#errors")).to_contain_text(f"Cannot reach the gateway at {nowhere}")
    await expect(page.get_by_role("button", name="Start talking")).to_be_enabled()


async def test_page_reconnects_after_the_gateway_restarts(open_page, question_wav):
    """The gateway stops: the page says it is reconnecting, and is live again once a gateway is back."""
    port = free_port()
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=port, ice_timeout_s=5), {})
    await gateway.start("127.0.0.1", port)
    page = await open_page(f"http://127.0.0.1:{port}/", microphone=question_wav)
    await page.get_by_role("button", name="Start talking").click()
    await expect(page.locator("#status")).to_have_text("Listening")
    first_id = await page.evaluate("window.edgestreamDemo.session.sessionId")
    await gateway.close()
    await expect(page.locator("#errors")).to_contain_text("reconnecting")
    await expect(page.locator("#status")).to_have_text("Reconnecting…")
    await expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    await page.screenshot(path=screenshot_path("gateway-lost"))
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=port, ice_timeout_s=5), {})
    await gateway.start("127.0.0.1", port)
    try:
        await expect(page.locator("#status")).to_have_text("Listening")
        await expect(page.locator("#errors .error")).to_have_count(0)
        session = await page.evaluate("({id: window.edgestreamDemo.session.sessionId, n: window.edgestreamDemo.session.reconnects})")
        assert session["n"] == 1 and session["id"] != first_id and session["id"] in gateway.sessions
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator("#status")).to_have_text("Idle")
        await wait_until(lambda: not gateway.sessions, timeout=15)
    finally:
        await gateway.close()


async def test_gateway_killed_mid_session_is_explained(open_page, question_wav):
    """A gateway process that dies (kill -9) says no goodbye: the page notices the lost link and retries."""
    import asyncio
    import signal
    import sys

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loopback-ice",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(60):
            while b"listening" not in await process.stdout.readline():
                pass
        page = await open_page(f"http://127.0.0.1:{port}/", microphone=question_wav)
        await page.get_by_role("button", name="Start talking").click()
        await expect(page.locator("#status")).to_have_text("Listening")
        process.send_signal(signal.SIGKILL)
        await expect(page.locator("#errors")).to_contain_text("The connection to the gateway was lost")
        await expect(page.locator("#status")).to_have_text("Reconnecting…")
        await expect(page.locator("#workers")).to_contain_text("gateway: unreachable", timeout=10_000)
        # Giving up is the person's choice: Stop ends the retries.
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator("#status")).to_have_text("Idle")
        await expect(page.get_by_role("button", name="Start talking")).to_be_enabled()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_page_with_a_token_gets_in_and_without_one_is_told_why(open_page, question_wav, tmp_path):
    from gateway.tokens import TokenFile
    from stream.config import SecuritySettings

    tokens = TokenFile(tmp_path / "tokens.json")
    token = tokens.create("browser")
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {}, SecuritySettings(client_tokens_file=str(tokens.path)))
    port = await gateway.start("127.0.0.1", 0)
    try:
        page = await open_page(f"http://127.0.0.1:{port}/", microphone=question_wav)
        await page.get_by_role("button", name="Start talking").click()
        await expect(page.locator("#errors")).to_contain_text("This gateway needs an access token")
        await expect(page.locator("#status")).to_have_text("Not connected")
        await page.get_by_label("Access token").fill(token)
        await page.get_by_role("button", name="Start talking").click()
        await expect(page.locator("#status")).to_have_text("Listening")
        assert [s.client for s in gateway.sessions.values()] == ["browser"]
        # The token can also come in the link, after '#', which no server sees.
        linked = await open_page(f"http://127.0.0.1:{port}/#token={token}", microphone=question_wav)
        await expect(linked.get_by_label("Access token")).to_have_value(token)
    finally:
        await gateway.close()


async def test_missing_worker_kind_is_explained_and_the_session_goes_on(workers, open_page, question_wav):
    _, urls = workers
    without_llm = {kind: kind_urls for kind, kind_urls in urls.items() if kind is not WorkerKind.LLM}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), without_llm)
    port = await gateway.start("127.0.0.1", 0)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    try:
        await gateway.pool.wait_ready([WorkerKind.STT], timeout=10)
        page = await open_page(page_url(gateway), microphone=question_wav)
        await expect(page.locator('#workers li[data-kind="llm"]')).to_have_text("language model: missing")
        await page.get_by_role("checkbox", name="Echo cancellation").uncheck()  # the test checks content
        await page.get_by_role("button", name="Start talking").click()
        await expect(page.locator("#errors")).to_contain_text("No language model worker is available")
        await expect(page.locator("#errors")).to_contain_text("edgestream worker llm")
        # The turn was still heard, and the session is still live.
        you = page.locator("#turns li[data-turn='1'] .you:not(.partial)")
        await expect(you).not_to_be_empty()
        assert word_error_rate(QUESTION, await you.inner_text()) <= 0.2
        await expect(page.locator("#status")).to_have_text("Listening")
        assert len(gateway.sessions) == 1
    finally:
        await gateway.close()


# -- the JavaScript SDK on its own, as a WebXR/AR app would use it -------------------------

SDK_SCRIPT = """
async ([pcm, rate]) => {
  const { GatewaySession } = await import("/edgestream.js");
  // An AR app's rendered view: a canvas with a sign on it, sent as camera frames.
  const canvas = document.createElement("canvas");
  canvas.width = 640; canvas.height = 360;
  const draw = (tick) => {
    const g = canvas.getContext("2d");
    g.fillStyle = "white"; g.fillRect(0, 0, 640, 360);
    g.fillStyle = "black"; g.font = "bold 72px sans-serif"; g.fillText("EXIT GATE 7", 90, 200);
    g.fillRect(0, 350, tick % 640, 2);  // changes every frame, so the canvas keeps streaming
  };
  let tick = 0;
  const painter = setInterval(() => draw(tick++), 50);
  const session = await GatewaySession.connect(GatewaySession.defaultUrl());  // no microphone yet
  await session.sendFrames(canvas.captureStream(20).getVideoTracks()[0]);
  await new Promise((r) => setTimeout(r, 1000));  // let a few frames arrive before speaking
  const spokeAt = await session.say(new Int16Array(pcm), rate);
  const final = await session.waitEvent("transcript.final", { match: { turn: 1 } });
  const vision = await session.waitEvent("vision", { match: { turn: 1 } });
  const done = await session.waitEvent("answer.done", { match: { turn: 1 } });
  const latency = await session.waitEvent("latency", { match: { turn: 1 } });
  const sessionId = session.sessionId;
  let timedOut = null;
  try { await session.waitEvent("answer.done", { timeoutMs: 200, match: { turn: 9 } }); }
  catch (err) { timedOut = err.code; }
  session.close();
  const reason = await session.closed;
  clearInterval(painter);
  return { sessionId, spokeAt, final: final.text, vision: vision.text, answer: done.text,
           firstAudio: latency.first_audio_sent, timedOut, reason, events: session.events.length };
}
"""


async def test_sdk_sends_speech_and_frames_and_closes(gateway, open_page, speak):
    from tests.conftest import with_silence

    page = await open_page(page_url(gateway))
    question = "What does the sign say?"
    pcm = with_silence(speak(question), after_s=1.0)
    result = await page.evaluate(SDK_SCRIPT, [pcm.tolist(), 16_000])
    assert word_error_rate(question, result["final"]) <= 0.2, result
    assert "EXITGATE7" in result["vision"].replace(" ", "").upper(), result
    assert result["answer"].strip() and result["firstAudio"] is not None
    assert result["timedOut"] == "timeout" and result["reason"] is None
    await wait_until(lambda: result["sessionId"] not in gateway.sessions, timeout=15)


async def test_sdk_example_page_sends_its_view_as_the_camera(bare_gateway, open_page, question_wav):
    page = await open_page(page_url(bare_gateway, "example.html"), microphone=question_wav)
    await page.get_by_role("button", name="Connect").click()
    await expect(page.get_by_role("log")).to_contain_text("session.ready")
    await wait_until(lambda: any(s.video_frames >= 3 for s in bare_gateway.sessions.values()), timeout=20)
    await page.get_by_role("button", name="Close").click()
    await expect(page.get_by_role("log")).to_contain_text("closed")
    await wait_until(lambda: not bare_gateway.sessions, timeout=15)


# -- accessible basics and a phone-sized screen ---------------------------------------------


async def test_page_is_keyboard_operable_and_fits_a_phone(bare_gateway, open_page):
    page = await open_page(page_url(bare_gateway), viewport={"width": 360, "height": 740})
    for role, name in (("button", "Start talking"), ("button", "Stop"), ("checkbox", "Camera"), ("checkbox", "Push to talk"), ("textbox", "Type a question")):
        await expect(page.get_by_role(role, name=name)).to_have_count(1)
    for name in ("You", "Answer"):
        await expect(page.get_by_role("meter", name=name, exact=True)).to_have_count(1)
    # Tab reaches the controls in reading order, and the focused one is outlined.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("button", name="Start talking")).to_be_focused()
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
    await page.keyboard.press("Tab")  # Stop is disabled: skipped
    await expect(page.get_by_role("checkbox", name="Camera")).to_be_focused()
    # Nothing wider than the screen, and touch targets of at least 44 px.
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = await page.get_by_role("button", name="Start talking").bounding_box()
    assert box is not None and box["height"] >= 44
    # On a phone the settings are folded away, so the conversation comes first; they open with a tap.
    await expect(page.get_by_role("checkbox", name="Echo cancellation")).to_be_hidden()
    await page.get_by_text("Settings").click()
    await expect(page.get_by_role("checkbox", name="Echo cancellation")).to_be_visible()


async def test_sdk_reconnects_after_a_gateway_restart_and_answers_again(workers, open_page, speak):
    from tests.conftest import with_silence

    _, urls = workers
    port = free_port()

    async def start_gateway() -> Gateway:
        gateway = Gateway(GatewaySettings(loopback_ice=True, port=port, ice_timeout_s=5), urls)
        await gateway.start("127.0.0.1", port)
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=10)
        return gateway

    gateway = await start_gateway()
    page = await open_page(f"http://127.0.0.1:{port}/example.html")
    first_id = await page.evaluate(
        """async () => {
          const { GatewaySession } = await import("/edgestream.js");
          window.jsSession = await GatewaySession.connect(GatewaySession.defaultUrl(), { reconnect: { initialMs: 200, maxMs: 1000 } });
          return window.jsSession.sessionId;
        }"""
    )
    await gateway.close()
    await page.wait_for_function("window.jsSession.events.some((e) => e.type === 'connection.lost')", timeout=TIMEOUT_MS)
    assert await page.evaluate("window.jsSession.isConnected") is False
    gateway = await start_gateway()
    try:
        question = "What is the capital of Germany?"
        pcm = with_silence(speak(question), after_s=1.0)
        result = await page.evaluate(
            """async ([pcm, rate]) => {
              const s = window.jsSession;
              const restored = await s.waitEvent("connection.restored", { timeoutMs: 20000 });
              const after = s.events.length;
              await s.say(new Int16Array(pcm), rate);
              const final = await s.waitEvent("transcript.final", { after, timeoutMs: 30000 });
              const done = await s.waitEvent("answer.done", { after, timeoutMs: 60000 });
              return { restored, final: final.text, answer: done.text, reconnects: s.reconnects, id: s.sessionId };
            }""",
            [pcm.tolist(), 16_000],
        )
        assert result["reconnects"] == 1 and result["id"] == result["restored"]["session_id"] != first_id
        assert word_error_rate(question, result["final"]) <= 0.25, result
        assert result["answer"].strip()
        await page.evaluate("window.jsSession.close()")
        await wait_until(lambda: not gateway.sessions, timeout=15)
    finally:
        await gateway.close()


async def test_page_over_https_with_the_self_signed_pair(open_page, question_wav, tmp_path):
    """On a LAN the page must be HTTPS (browsers give the microphone only to secure pages)."""
    from gateway.tokens import TokenFile
    from stream import tls
    from stream.config import SecuritySettings

    cert, key = tmp_path / "edgestream.crt", tmp_path / "edgestream.key"
    tls.create_self_signed(cert, key, ["localhost", "127.0.0.1"])
    tokens = TokenFile(tmp_path / "tokens.json")
    token = tokens.create("phone")
    security = SecuritySettings(client_tokens_file=str(tokens.path), tls_cert=str(cert), tls_key=str(key))
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {}, security)
    port = await gateway.start("127.0.0.1", 0)
    try:
        page = await open_page(f"https://127.0.0.1:{port}/#token={token}", microphone=question_wav, trust_any_certificate=True)
        await expect(page.locator("#workers li")).to_have_count(4)  # /healthz over https
        assert await page.evaluate("window.isSecureContext && window.edgestreamDemo.gatewayUrl") == f"wss://127.0.0.1:{port}/session"
        await page.get_by_role("button", name="Start talking").click()
        await expect(page.locator("#status")).to_have_text("Listening")
        assert [s.client for s in gateway.sessions.values()] == ["phone"]
    finally:
        await gateway.close()
