"""ml.progress: a log line every N items and a closing line, through real logging."""

from __future__ import annotations

import logging

import pytest

from ml.progress import Progress

LOGGER = "tests.progress"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage().split(" in ")[0] for record in caplog.records if record.name == LOGGER]


def test_a_line_every_n_items_and_one_for_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("feature extraction", 250, 100, logger=logging.getLogger(LOGGER)) as progress:
        for _ in range(25):
            progress.advance(10)
    assert lines(caplog) == [
        "feature extraction: 100/250 images (40%)",
        "feature extraction: 200/250 images (80%)",
        "feature extraction: 250/250 images (100%)",
    ]


def test_uneven_steps_log_once_per_crossed_multiple_and_no_repeat_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("tuning trials", 4, 2, unit="trials", logger=logging.getLogger(LOGGER)) as progress:
        progress.reach(1)
        progress.reach(1)  # the same count again (a poll without news) logs nothing
        progress.reach(3)  # crosses 2: the line says where it is
        progress.reach(4)
    assert lines(caplog) == ["tuning trials: 3/4 trials (75%)", "tuning trials: 4/4 trials (100%)"]


def test_zero_every_logs_only_the_closing_line_and_nothing_done_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    logger = logging.getLogger(LOGGER)
    with Progress("ingest inspection", None, 0, logger=logger) as progress:
        progress.advance(7)
    with Progress("ingest inspection", 0, 100, logger=logger):
        pass
    assert lines(caplog) == ["ingest inspection: 7 images"]


def test_no_bar_when_stderr_is_no_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = Progress("validation", 5, 1, unit="parts", logger=logging.getLogger(LOGGER))
    assert progress._bar is None  # pytest captures stderr: what Airflow's task logs see
    progress.close()
