"""The README's screenshots of the page, taken in a real headless Chromium against a running system.

    edgestream up &                      # wait for its "ready:" line
    python -m gateway.harness.screenshots --out web/screenshots

For each size (desktop 1200x850, phone 390x844) it saves the page idle, an
answer being spoken (a typed question, so the shot is the same on every
box), the answered turn with its latency chart, and the error a page shows
when the gateway cannot be reached. Needs Playwright and Debian's
``chromium`` (the test extra and ``.ci/run`` install both).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

from playwright.async_api import Page, async_playwright

SIZES = {"desktop": {"width": 1200, "height": 850}, "phone": {"width": 390, "height": 844}}
QUESTION = "What is the capital of France?"
FLAGS = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


async def _shoot(page: Page, url: str, out: Path, size: str) -> list[Path]:
    saved = []

    async def save(state: str) -> None:
        path = out / f"{size}-{state}.png"
        await page.screenshot(path=path, full_page=size == "desktop")
        saved.append(path)

    await page.goto(url)
    await page.wait_for_selector('#workers li[data-state="ready"]', timeout=30_000)
    await save("idle")
    await page.get_by_role("button", name="Start talking").click()
    await page.wait_for_selector('#status[data-state="listening"]', timeout=30_000)
    await page.get_by_role("textbox", name="Type a question").fill(QUESTION)
    await page.get_by_role("button", name="Send").click()
    await page.wait_for_selector('#status[data-state="speaking"]', timeout=60_000)
    await save("speaking")
    await page.wait_for_selector('#status[data-state="listening"]', timeout=60_000)
    await page.wait_for_selector(".latency-turn", timeout=10_000)
    await save("answered")
    await page.get_by_role("button", name="Stop").click()
    await page.goto(url + "?gateway=ws://127.0.0.1:9/session")  # a gateway nobody runs
    await page.get_by_role("button", name="Start talking").click()
    await page.wait_for_selector("#errors .error", timeout=30_000)
    await save("error")
    return saved


async def take(url: str, out: Path, chromium: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        try:
            for size, viewport in SIZES.items():
                page = await browser.new_page(viewport=viewport)
                saved += await _shoot(page, url, out, size)
                await page.close()
        finally:
            await browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/", help="the page of a running system (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("web/screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    arguments = parser.parse_args()
    for path in asyncio.run(take(arguments.url, arguments.out, arguments.chromium)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
