"""Headless Debian Chromium for the browser tests: its own ChromeDriver, nothing downloaded.

Selenium is given the driver's path, so Selenium Manager never fetches a browser or a driver.
``make test`` installs Debian's ``chromium`` and ``chromium-driver``; CI (``.ci/run``) sets
``MLOPS_REQUIRE_BROWSER=1`` so a missing browser fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("MLOPS_REQUIRE_BROWSER") == "1"
STEP_SECONDS = 120  # a page, an element (2 slow cores, a cold React bundle)
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not REQUIRED,
    reason="needs Debian's chromium and chromium-driver (`make browser` installs them as root: "
    "apt-get install -y chromium chromium-driver)",
)


@contextlib.contextmanager
def chromium(folder: Path) -> Iterator[Any]:
    """A headless Chromium; its last page's source and a screenshot are kept in ``folder``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # the machine's network is closed: no calls home
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={folder / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(STEP_SECONDS)
    try:
        yield driver
    finally:
        (folder / "last_page.html").write_text(driver.page_source)
        driver.save_screenshot(str(folder / "last_page.png"))
        driver.quit()
