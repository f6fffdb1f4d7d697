"""Child processes that never outlive the process that started them (issue 19).

Every subprocess a stage starts (torchrun, img2dataset, Spark's driver) goes through `spawn`, and our own
long-running entry points (trainer, fine-tune, the img2dataset wrappers) call `follow_parent` first thing.
Three mechanisms, because each covers a hole the others leave:

1. Parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), armed in the child between fork and exec: the
   kernel signals the child the moment its parent dies, SIGKILL and the OOM killer included. The signal
   fires when the *thread* that forked the child exits, and Prefect runs tasks in worker threads that come
   and go, so `spawn` forks from one long-lived daemon thread of ours that lives exactly as long as the
   process. The signal is SIGTERM: torchrun forwards it to its ranks, which checkpoint at the step boundary.
2. A parent-pid watchdog (`follow_parent`): torchrun and multiprocessing start *their* children without a
   death signal (torchrun even gives each rank a session of its own), so the grandchildren watch their
   parent themselves; once orphaned they stop (gracefully first where they can), then SIGKILL their own
   process group (loader and pool workers with them).
3. Termination forwarding (`terminate`, `forward_termination`): SIGTERM to the orchestrator (Prefect
   cancellation, a pod's SIGTERM, a user) reaches every live child as SIGTERM, escalated to SIGKILL of the
   child's whole process group after a grace period, and a child's group is swept with SIGKILL once its
   leader has exited (pool workers that outlive it), before the leader is reaped so its id cannot have
   been reused.

Children start in a session of their own (start_new_session) so one signal reaches a whole tree.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1
SPAWNED_BY_ENV = "SLIP_SPAWNED_BY"
WAIT_POLL_S = 0.1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies. Linux only; False elsewhere."""
    return _LIBC is not None and _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def pid_alive(pid: int) -> bool:
    """True if `pid` names a process that has not exited (zombies count as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # no /proc (not Linux): signal 0 tells whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def start_ticks(pid: int) -> int:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22): with the pid it names one
    process for good, so a lock whose holder died is not mistaken for a newer process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


class _Spawner:
    """One daemon thread that does every fork, so children's parent-death signal follows the process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="slip-spawner", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def _serve(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                fut.set_exception(e)


_SPAWNER = _Spawner()
_LIVE: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()
_TERMINATED: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()  # got SIGTERM from us already


def spawn(cmd: list[str], *, death_signal: int = signal.SIGTERM, **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd) in a session of its own that gets `death_signal` when this process dies.
    Its tree inherits SPAWNED_BY_ENV (our pid), by which `follow_parent` recognises a tree member whose
    parent died before it started watching."""
    parent = os.getpid()
    popen_kwargs["env"] = {**(os.environ if popen_kwargs.get("env") is None else popen_kwargs["env"]),
                           SPAWNED_BY_ENV: str(parent)}

    def arm() -> None:  # in the child, between fork and exec: no locks, no imports
        set_parent_death_signal(death_signal)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(128 + int(death_signal))

    if popen_kwargs.pop("preexec_fn", None) is not None:
        raise ValueError("procs.spawn sets preexec_fn itself")
    popen_kwargs.setdefault("start_new_session", True)
    proc = _SPAWNER.call(lambda: subprocess.Popen(cmd, preexec_fn=arm, **popen_kwargs))
    _LIVE.add(proc)
    return proc


def signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Send `sig` to the child's process group (itself if it shares ours); False if it was already reaped."""
    if proc.returncode is not None:  # reaped: its pid may belong to another process by now
        return False
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    if sig == signal.SIGTERM:
        _TERMINATED.add(proc)
    return True


def _exited(proc: subprocess.Popen) -> bool:
    """Has the child exited? Does not reap it (WNOWAIT), so its pid and group id stay ours meanwhile."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped elsewhere
        return True


def wait(proc: subprocess.Popen, timeout: float | None = None, stop: Callable[[], bool] | None = None) -> int:
    """Wait for the child, then SIGKILL what is left of its process group and reap it. Raises
    subprocess.TimeoutExpired after `timeout`; terminates the child and returns once `stop()` is true."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _exited(proc):
        if stop is not None and stop():
            return terminate(proc)
        if deadline is not None and time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(WAIT_POLL_S)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of its group (no-op if it shared ours: pgid != pid)
    rc = proc.wait()
    _LIVE.discard(proc)
    return rc


def terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM the child's group (once), SIGKILL it after `grace_s`; returns the exit code."""
    if proc not in _TERMINATED:
        signal_group(proc, signal.SIGTERM)
    try:
        return wait(proc, timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        return wait(proc)


def live_children() -> list[subprocess.Popen]:
    return [p for p in list(_LIVE) if p.returncode is None]


def terminate_all_async() -> int:
    """SIGTERM every live child's group without waiting (safe in a signal handler); returns how many."""
    return sum(signal_group(p, signal.SIGTERM) for p in live_children() if p not in _TERMINATED)


@contextlib.contextmanager
def forward_termination() -> Iterator[None]:
    """While inside: SIGTERM to this process is first passed to every live child, then handled as before.

    For code whose main thread waits on worker threads that wait on children (Prefect's mapped tasks): the
    previous handler (Prefect's) raises in the main thread, whose unwinding waits for those worker
    threads, which return once their children have exited. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: we cannot chain to it, so fall back to the default
        previous = signal.SIG_DFL

    def handler(signum, frame):
        terminate_all_async()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kill_own_tree() -> None:
    """SIGKILL our process group if we lead it (our workers die with us), else our children and us."""
    if os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_group_members(pgid: int, markers: tuple[bytes, ...], attempts: int = 50) -> None:
    """SIGKILL the members of process group `pgid` whose command line holds one of `markers` (what a killed
    run of another process left behind; the markers guard against a reused group id), until none is left."""
    for _ in range(attempts):
        members = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    group = int(f.read().rsplit(b")", 1)[1].split()[2])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if group == pgid and any(m in cmd for m in markers):
                members.append(int(pid))
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class _LossTolerant:
    """A sys.stdout / sys.stderr whose reader may go away: once a write meets a broken pipe, the stream's file
    descriptor is pointed at /dev/null and writing goes on. Without it an orphan's next log line would kill
    it (BrokenPipeError) before it could checkpoint."""

    def __init__(self, stream, fd: int):
        self._stream, self._fd = stream, fd

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._fd)
        os.close(devnull)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerate_lost_output() -> None:
    """Keep running when whoever reads our stdout / stderr (a pipe to the launcher) is gone."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _LossTolerant):
            setattr(sys, name, _LossTolerant(stream, fd))


def _born_orphan() -> bool:
    """True if we belong to a tree `spawn` started and our parent is not of it any more: it died while we
    were still starting (importing torch takes seconds), so we were re-parented before we could watch it.
    Our parent is of the tree if it is the spawning process or carries the same SPAWNED_BY_ENV."""
    spawner = os.environ.get(SPAWNED_BY_ENV, "")
    ppid = os.getppid()
    if not spawner.isdigit() or ppid == int(spawner):
        return False
    if ppid == 1:  # init is never of the tree (the spawning process is not init: that was the case above)
        return True
    try:
        with open(f"/proc/{ppid}/environ", "rb") as f:
            return f"{SPAWNED_BY_ENV}={spawner}".encode() not in f.read().split(b"\0")
    except OSError:  # not ours to read (another user's reaper) or gone: we cannot tell, so assume not
        return False


def follow_parent(graceful: bool, grace_s: float = 10.0, poll_s: float = 0.5,
                  parent: int | None = None) -> threading.Thread | None:
    """Make this process end when the process that started it does (call first thing in an entry point).

    A daemon thread watches our parent pid; once it changes (we were re-parented to init or a subreaper),
    `graceful` sends us SIGTERM (the trainer checkpoints at its step boundary and exits) and SIGKILLs our
    tree `grace_s` later if we are still there; otherwise the tree is killed at once. With `graceful` False
    SIGTERM also kills the whole tree at once (img2dataset has no graceful stop, and its pool workers would
    otherwise finish and publish a shard nobody waits for). Output to a vanished reader is dropped, not
    fatal (tolerate_lost_output). `parent`: the pid we were started by, when the caller knows it (a pool
    initializer: the pool's owner may already be gone when the worker gets here). Returns the thread, or
    None when our parent is init and we were not started under `spawn` (a container's entry point)."""
    tolerate_lost_output()
    if not graceful and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: kill_own_tree())
    if parent is None:
        parent = -1 if _born_orphan() else os.getppid()
    if parent == 1:  # started by init itself: nothing to follow
        return None
    # No parent-death signal on ourselves: it would follow whichever thread of our parent forked us, which
    # need not live as long as our parent does. Polling getppid costs one syscall per poll_s.

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        gone = f"parent process {parent}" if parent > 0 else "the process that started us (before we watched it)"
        os.write(2, f"{gone} exited: stopping (pid {os.getpid()})\n".encode())
        if graceful:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(grace_s)
        kill_own_tree()

    t = threading.Thread(target=watch, name="slip-parent-watchdog", daemon=True)
    t.start()
    return t
