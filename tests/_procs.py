"""Process helpers for tests: stopping a background service, finding every process of one run.

A run is recognised by an environment variable the test gives it (`tag_env`): every descendant inherits it
(torchrun, its ranks, img2dataset, its pool workers, Spark's JVM), re-parented orphans included, which a
walk of the process tree would miss.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid

from slip_core import procs

TAG = "SLIP_TEST_RUN_TAG"


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a test's background service (started with start_new_session=True) with all its children."""
    procs.terminate(proc, grace_s=grace_s)


def tag_env(env: dict | None = None) -> tuple[str, dict]:
    """(tag, env with the tag set): pass env to the run, then look it up with `tagged(tag)`."""
    tag = uuid.uuid4().hex
    return tag, {**(os.environ if env is None else env), TAG: tag}


def tagged(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process carrying `tag` (zombies excluded)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile, or not ours
            continue
        if procs.pid_alive(int(pid)):
            found.append((int(pid), cmd))
    return found


def wait_untagged(tag: str, timeout_s: float) -> list[tuple[int, str]]:
    """Wait up to `timeout_s` for every process carrying `tag` to exit; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever still carries `tag` (a failed test's cleanup)."""
    for pid, _ in tagged(tag):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def short(cmd: str, width: int = 90) -> str:
    """A command line cut to something a table cell can hold."""
    cmd = cmd.replace(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/", "")
    return cmd if len(cmd) <= width else cmd[:width - 3] + "..."
