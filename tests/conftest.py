"""Test-session setup: isolated Prefect home/result storage, one real Prefect server per session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Must happen before prefect is imported anywhere: results and cache keys live in result storage,
# which survives a fresh database (ENVIRONMENT.md 1.2), so every session gets its own.
_PREFECT_TMP = tempfile.mkdtemp(prefix="slip-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_TMP
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_TMP, "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.pop("PREFECT_API_URL", None)

# Prefect imported now, with the settings above: a test calling flows.cli.main in this process then runs its
# flows in-process as before, instead of starting a `slip` temporary server here (flows/prefect_server.py
# connect() leaves an embedding process that has imported Prefect alone); subprocesses still get their own.
import prefect  # noqa: E402,F401
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (SQLite, subprocess) shared by the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# ------------------------------------------------------------------------------------ fault table
from tests._faults import FaultLog, write_table  # noqa: E402

_FAULT_ROWS: list = []


@pytest.fixture
def fault_log(request) -> FaultLog:
    """Record a fault/hostile input and what the test observed (see tests/_faults.py)."""
    log = FaultLog(request.node.nodeid)
    request.node.stash[_FAULT_KEY] = log
    return log


_FAULT_KEY = pytest.StashKey[FaultLog]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.passed and _FAULT_KEY in item.stash:
        _FAULT_ROWS.extend(item.stash[_FAULT_KEY].rows)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SLIP_FAULT_TABLE")
    if path and exitstatus == 0 and _FAULT_ROWS:
        write_table(_FAULT_ROWS, path)
