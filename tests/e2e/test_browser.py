"""The Airflow 3 web UI in headless Chromium: log in as admin, trigger ``retrain`` from its DAG
page with non-default parameters, and watch the run succeed.

Debian's ``chromium`` and ``chromium-driver`` drive the browser (``tests/browser.py``).
With nothing ingested, retrain's ``train`` task returns ``no_data`` and skips the rest, so the run
succeeds within seconds of starting.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser import STEP_SECONDS, chromium, needs_browser
from tests.conftest import REPO
from tests.e2e.standalone import standalone

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_browser]
SCREENSHOT = REPO / ".data" / "screenshots" / "browser_retrain.png"
RUN_SECONDS = 480  # the manual run may queue behind the scheduled one (max_active_runs=1)


@dataclass(frozen=True)
class Airflow:
    api: Any  # ml.stack.Api, logged in as admin
    url: str
    home: Path
    password: str


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, airflow_db: Path) -> Iterator[Airflow]:
    """One ``airflow standalone`` (same setup as tests/e2e/test_scheduler.py), nothing ingested."""
    from ml.ops import stack

    root = tmp_path_factory.mktemp("browser")
    # Selenium Manager, were it ever asked, must not download
    with standalone(root, SE_OFFLINE="true") as home:
        password = json.loads((stack.airflow_home() / stack.PASSWORDS_FILE).read_text())["admin"]
        yield Airflow(stack.Api.as_admin(), stack.api_url(), home, password)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path) as driver:
        yield driver


def test_trigger_retrain_from_the_ui_with_parameters(airflow: Airflow, browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, STEP_SECONDS, poll_frequency=1)
    note = f"browser test {uuid.uuid4()}"

    # The DAG page redirects to the simple auth manager's login form, then back.
    browser.get(f"{airflow.url}/dags/retrain")
    wait.until(ec.visibility_of_element_located((By.NAME, "username"))).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(airflow.password)
    wait.until(ec.element_to_be_clickable((By.XPATH, "//form//button[@type='submit']"))).click()
    wait.until(ec.url_contains("/dags/retrain"))

    # Trigger -> the form built from the DAG's params (inputs named element_<param>).
    trigger = "//button[normalize-space()='Trigger']"
    wait.until(ec.element_to_be_clickable((By.XPATH, trigger))).click()
    dialog = "//*[@role='dialog']"
    epochs = wait.until(
        ec.visibility_of_element_located((By.XPATH, f"{dialog}//input[@name='element_epochs']"))
    )
    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("3")
    note_input = browser.find_element(By.XPATH, f"{dialog}//input[@name='element_note']")
    note_input.send_keys(Keys.CONTROL, "a")
    note_input.send_keys(note)
    wait.until(lambda _: epochs.get_attribute("value") == "3" and note_input.get_attribute("value") == note)
    submit = f"{dialog}//button[@data-testid='trigger-dag-submit' or normalize-space()='Trigger']"
    wait.until(ec.element_to_be_clickable((By.XPATH, submit))).click()

    # The UI opens the new run's page: /dags/retrain/runs/<run_id>.
    wait.until(ec.url_contains("/dags/retrain/runs/"))
    run_id = urllib.parse.unquote(browser.current_url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
    assert run_id.startswith("manual__"), browser.current_url
    badge = (By.CSS_SELECTOR, "[data-testid='header-card'] [data-testid='state-badge']")
    last_reload = [time.monotonic()]

    def run_state_shown(driver: Any) -> str | bool:
        header = driver.find_element(By.CSS_SELECTOR, "[data-testid='header-card']").text
        state = driver.find_element(*badge).text.strip().lower()
        if run_id in header and state in ("success", "failed"):
            return state
        if time.monotonic() - last_reload[0] > 30:  # the page polls while a run is active; reload anyway
            last_reload[0] = time.monotonic()
            driver.refresh()
        return False

    state = WebDriverWait(
        browser,
        RUN_SECONDS,
        poll_frequency=2,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(run_state_shown, f"run {run_id} did not end; see {airflow.home / 'standalone.log'}")

    shot = tmp_path / "browser_retrain.png"
    assert browser.save_screenshot(str(shot))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    print(f"\nscreenshot: {shot} (copied to {SCREENSHOT})")
    assert state == "success", f"the UI shows run {run_id} {state}; see {airflow.home / 'standalone.log'}"

    # The REST API agrees: triggered from the UI by admin, with the values typed into the form.
    run = airflow.api.call(f"/api/v2/dags/retrain/dagRuns/{urllib.parse.quote(run_id, safe='')}")
    assert run["state"] == "success" and run["run_type"] == "manual"
    assert run["triggered_by"] == "ui" and run["triggering_user_name"] == "admin"
    assert run["conf"]["epochs"] == 3 and run["conf"]["note"] == note
    assert run["conf"]["force"] is False
