"""What every console test needs from the browser: Debian's Chromium (Playwright never
downloads one), its flags, and signing in the way a person does."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from playwright.sync_api import BrowserContext, Page, Playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 15_000


class Console(Protocol):
    url: str
    password: str


def launch(playwright: Playwright, profile: Path, executable: str = CHROMIUM, **options: Any) -> BrowserContext:
    """Chromium (or a launcher that runs it, see ``browser_netns``) with a fresh profile."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt package 'chromium'): run ./bootstrap.sh test"
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 860}, timeout=60_000, **options,
    )
    context.set_default_timeout(WAIT_MS)
    return context


def sign_in(page: Page, console: Console, path: str = "/") -> None:
    page.goto(console.url + path)
    password = page.get_by_label("Password")
    main_nav = page.get_by_role("navigation", name="Main")
    expect(password.or_(main_nav)).to_be_visible()
    if password.is_visible():
        page.get_by_label("User name").fill("admin")
        password.fill(console.password)
        page.get_by_role("button", name="Sign in").click()
    expect(main_nav).to_be_visible()
