"""A persistent local Prefect server (`slip server start|stop|status`) and finding it from the CLI.

Without PREFECT_API_URL, every `slip` command that runs a flow starts Prefect's ephemeral server (~17 s of a
20 s no-op reproduce). `slip server start` runs `prefect server start` bound to 127.0.0.1 as a detached
process group, its SQLite database and log in a Prefect home folder (the store's `.prefect/` with `--store`,
else $PREFECT_HOME or ~/.prefect), and writes `slip-server.json` (pid, url) there. The CLI then uses a
running one when it finds it (the store's first, then PREFECT_HOME's), a temporary one otherwise;
an explicit PREFECT_API_URL always wins. `stop` ends the whole process group and removes the pid file.

With neither, `connect` starts a temporary server of our own instead of Prefect's ephemeral one (issue 19:
Prefect's is a plain uvicorn subprocess that outlives a SIGKILLed or SIGTERMed `slip`). Ours is the same
`prefect server start` (uvicorn in-process, no children of its own: one process), in the same PREFECT_HOME
and with the ephemeral server's service set (PREFECT__SERVER_EPHEMERAL), started through `procs.spawn`, so
the kernel stops it when this process dies by any means; at a normal exit it is stopped at interpreter exit,
after Prefect's own exit hooks (which still talk to it) have run.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request

from slip_core import procs
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
    if not procs.pid_alive(pid):
        return False
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


class ServerUnavailable(RuntimeError):
    """No Prefect server could be started for this process (a one-line message for the CLI)."""


_TEMPORARY: list[subprocess.Popen] = []  # the temporary server of this process, if it started one
TEMP_LOG = "temporary-server.log"
FALSE = ("0", "false", "no", "off")


def _profile(home_dir: str) -> dict:
    """Settings of the active Prefect profile (`prefect config set` / `prefect cloud login` write there)."""
    try:
        with open(os.path.join(home_dir, "profiles.toml"), "rb") as f:
            profiles = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return profiles.get("profiles", {}).get(active) or {}


def _prefect_chooses(home_dir: str) -> bool:
    """True if the user's Prefect settings name a server, or forbid one started on the fly."""
    settings = {**_profile(home_dir), **os.environ}
    if settings.get("PREFECT_API_URL"):
        return True
    return any(str(settings.get(k, "")).lower() in FALSE
               for k in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"))


def start_temporary(home_dir: str, timeout_s: float, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start a Prefect server for this process alone and wait until it is healthy; it gets SIGTERM from the
    kernel when this process dies, and `stop_temporary` ends it. `attempts`: a free port can be taken by
    someone else before the server binds it, so a server that exits while starting is retried on another."""
    os.makedirs(home_dir, exist_ok=True)
    log_path = os.path.join(home_dir, TEMP_LOG)
    for _ in range(attempts):
        port = _free_port()
        url = f"http://{HOST}:{port}/api"
        env = {**os.environ, "PREFECT_HOME": home_dir, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": url, "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_UI_ENABLED": "0"}
        with open(log_path, "ab") as log:
            proc = procs.spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not _healthy(url, 1.0):
            if not procs.pid_alive(proc.pid) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return proc, url
        timed_out = time.monotonic() > deadline
        procs.terminate(proc, grace_s=5.0)
        if timed_out:
            break
    raise ServerUnavailable(f"the temporary Prefect server did not come up within {timeout_s:.0f} s (see {log_path}); "
                       "or start one with `slip server start`, or set PREFECT_API_URL")


def stop_temporary(grace_s: float = 10.0) -> None:
    """Stop this process's temporary server, if it started one (its whole process group)."""
    while _TEMPORARY:
        procs.terminate(_TEMPORARY.pop(), grace_s=grace_s)


def connect(store: str | None) -> str | None:
    """Point this process at a Prefect server (before Prefect is imported) unless PREFECT_API_URL is set:
    a running `slip server start` one (the store's, then PREFECT_HOME's), else a temporary one of its own.
    (started at the first `import prefect`: see _StartOnImport). Returns the URL found, else None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # settings are read at import: an embedding process has chosen already
        return None
    url = find(store)
    if url:
        os.environ["PREFECT_API_URL"] = url
        return url
    if _prefect_chooses(home(None)):
        return None
    if not any(isinstance(f, _StartOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _StartOnImport())
    return None


def start_for_this_process() -> str:
    """Start this process's temporary server in PREFECT_HOME and point PREFECT_API_URL at it."""
    timeout_s = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 20)
    proc, url = start_temporary(home(None), timeout_s)
    _TEMPORARY.append(proc)
    atexit.register(stop_temporary)  # registered before Prefect is imported: runs after its exit hooks
    os.environ["PREFECT_API_URL"] = url
    return url


class _StartOnImport(importlib.abc.MetaPathFinder):
    """Starts the temporary server at the first `import prefect`, before Prefect reads its settings, so a
    command that never uses Prefect (`slip dataset gc`, `build --no-prefect`) starts none. One shot; a
    forked child that inherited it starts nothing (it would die with the thread that forked it).

    find_spec runs under the interpreter's import lock, which a fork (our spawner thread's) waits for, so
    the start happens in the loader's exec_module (under Prefect's module lock only), before Prefect's own."""

    def __init__(self):
        self.pid = os.getpid()

    def find_spec(self, name, path=None, target=None):
        if name != "prefect":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or os.getpid() != self.pid:
            return spec
        spec.loader = _StartThenLoad(spec.loader)
        return spec


class _StartThenLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # Prefect's own from here on
        if not os.environ.get("PREFECT_API_URL"):
            start_for_this_process()
        self.loader.exec_module(module)
