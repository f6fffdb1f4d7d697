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
