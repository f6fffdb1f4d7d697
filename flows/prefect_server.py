"""A persistent local Prefect server (`slip server start|stop|status`) and finding it from the CLI.

Without PREFECT_API_URL, every `slip` command that runs a flow starts Prefect's ephemeral server (~17 s of a
20 s no-op reproduce). `slip server start` runs `prefect server start` bound to 127.0.0.1 as a detached
process group, its SQLite database and log in a Prefect home folder (the store's `.prefect/` with `--store`,
else $PREFECT_HOME or ~/.prefect), and writes `slip-server.json` (pid, url) there. The CLI then uses a
running one when it finds it (the store's first, then PREFECT_HOME's), the ephemeral server otherwise;
an explicit PREFECT_API_URL always wins. `stop` ends the whole process group and removes the pid file.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from slip_core.store import Store

STATE_FILE = "slip-server.json"
HOST = "127.0.0.1"


def home(store: str | None = None) -> str:
    """The Prefect home a server for `store` (or the user's default one) lives in."""
    if store:
        return Store(store).prefect_home()
    return os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid is not ours: only a `prefect server` process counts
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
        return b"prefect" in cmd and b"server" in cmd
    except OSError:
        return True


def state(home_dir: str) -> dict | None:
    """The recorded server of `home_dir` if its process is alive, else None (a stale file is removed)."""
    path = os.path.join(home_dir, STATE_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not _alive(int(info.get("pid", 0))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(home_dir: str, port: int = 4200, timeout_s: float = 180.0) -> tuple[dict, bool]:
    """(server info, started now?) — an already running server of this home is reused. `port` 0: a free one."""
    info = state(home_dir)
    if info:
        return info, False
    os.makedirs(home_dir, exist_ok=True)
    port = port or _free_port()
    with socket.socket() as s:
        if s.connect_ex((HOST, port)) == 0:
            raise RuntimeError(f"port {port} on {HOST} is in use by another process; pick one with --port")
    url = f"http://{HOST}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": home_dir, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url}
    with open(os.path.join(home_dir, "server.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    info = {"pid": proc.pid, "url": url, "home": home_dir, "started_at": time.time()}
    deadline = time.monotonic() + timeout_s
    while not _healthy(url, 1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc.pid, 10.0)
            raise RuntimeError(f"the Prefect server did not come up (see {os.path.join(home_dir, 'server.log')})")
        time.sleep(0.5)
    with open(os.path.join(home_dir, STATE_FILE), "w") as f:
        json.dump(info, f)
    return info, True


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`; returns once no member is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop(home_dir: str, grace_s: float = 20.0) -> dict | None:
    """Stop the server of `home_dir`; returns its info, or None if none was running."""
    info = state(home_dir)
    if info is None:
        return None
    _kill_group(int(info["pid"]), grace_s)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(home_dir, STATE_FILE))
    return info


def find(store: str | None) -> str | None:
    """API URL of a healthy running server for `store` (its own first, then PREFECT_HOME's), else None."""
    homes = [home(store)] if store else []
    homes.append(home(None))
    for h in dict.fromkeys(homes):
        info = state(h)
        if info and _healthy(info["url"]):
            return info["url"]
    return None


def connect(store: str | None) -> str | None:
    """Point this process at a running server (before Prefect is imported) unless PREFECT_API_URL is set.
    Returns the URL used, None for the ephemeral server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # settings are read at import: an embedding process has chosen already
        return None
    url = find(store)
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url
