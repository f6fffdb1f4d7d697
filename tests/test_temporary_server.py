"""A `slip` command run without a Prefect server starts a temporary one that never outlives it (issue 19).

Prefect's own ephemeral server is a plain uvicorn subprocess: a SIGKILLed or SIGTERMed `slip` left it running.
Each case runs a real flow command (`slip dataset build` of a one-row table) with no PREFECT_API_URL and its
own PREFECT_HOME, tagged (tests/_procs.py), so every process of its tree is found, re-parented orphans too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests._procs import kill_tagged, short, tag_env, tagged, wait_untagged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_S = 10.0  # every process of a killed run is gone this long after the kill
START_S = 120.0  # the temporary server's startup on a loaded 2-core box


def _build(tmp_path) -> tuple[list[str], str, dict]:
    """(command, Prefect home, tagged env) of a one-row `slip dataset build` whose one URL is refused."""
    table = tmp_path / "table.csv"
    table.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a photo of a cat\n")
    home = str(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    tag, env = tag_env({**env, "PYTHONPATH": REPO, "PREFECT_HOME": home, "OMP_NUM_THREADS": "1",
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(START_S))})
    cmd = [sys.executable, "-m", "flows.cli", "dataset", "build", str(table), "--preset", "tiny",
           "--store", str(tmp_path / "store")]
    return cmd, home, {**env, "_TAG": tag}


def _servers(tag: str) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in tagged(tag) if "prefect server start" in cmd or "uvicorn" in cmd]


def _healthy_server(tag: str, proc: subprocess.Popen, log: str) -> int:
    """Wait until the run's temporary server answers /api/health; returns its pid."""
    import urllib.request

    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"slip exited ({proc.returncode}) before its server was up:\n{open(log).read()[-3000:]}"
        for pid, cmd in _servers(tag):
            port = cmd.split("--port")[-1].split()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as r:
                    if r.status == 200:
                        return pid
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no healthy temporary server within {START_S} s:\n{open(log).read()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_command_leaves_no_prefect_server(tmp_path, sig):
    cmd, _, env = _build(tmp_path)
    tag = env.pop("_TAG")
    log = str(tmp_path / "slip.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = _healthy_server(tag, proc, log)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left = wait_untagged(tag, BOUND_S)
        assert not left, (f"{BOUND_S:.0f} s after {sig.name} of slip (server pid {server}) these are alive:\n"
                          + "\n".join(f"  {pid} {short(c)}" for pid, c in left))
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)


def test_a_finished_command_stops_its_temporary_server(tmp_path):
    cmd, home, env = _build(tmp_path)
    tag = env.pop("_TAG")
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert "Starting temporary server" not in r.stderr + r.stdout, "Prefect's own ephemeral server was used"
        server_log = os.path.join(home, "temporary-server.log")
        assert os.path.exists(server_log), f"no temporary server was started:\n{r.stderr[-3000:]}"
        left = tagged(tag)  # at once: the command stops its server before it exits
        assert not left, "still alive after slip exited:\n" + "\n".join(f"  {pid} {short(c)}" for pid, c in left)
        # the flow itself ran against that server: the one row has a recorded fate, the run a clear outcome
        assert r.returncode in (0, 1), r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    finally:
        kill_tagged(tag)


def test_a_command_that_never_imports_prefect_starts_no_server(tmp_path):
    """The server starts at the first `import prefect`: `slip dataset gc` (no flow) must not pay ~17 s for one."""
    cmd, home, env = _build(tmp_path)
    tag = env.pop("_TAG")
    store = tmp_path / "store"
    store.mkdir()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "gc", "--store", str(store)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(home, "temporary-server.log")), "a server was started for nothing"
    assert not tagged(tag)
