"""Launch the trainer under torchrun as a subprocess, and summarise a finished run (loss curve).

Used by flows/pretrain.py, but free of Prefect: the caller passes a log callback. A subprocess (not an
in-process call) because a Prefect task running in a worker thread cannot be interrupted (ENVIRONMENT.md
§1.7): we enforce the timeout ourselves by killing the whole process group, and report the exit code so
the caller can raise and let retries apply.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable


class TrainProcessError(RuntimeError):
    def __init__(self, msg: str, returncode: int | None, tail: list[str]):
        super().__init__(msg + ("\n--- last output ---\n" + "\n".join(tail[-30:]) if tail else ""))
        self.returncode = returncode


def torchrun_command(dataset: str, out_dir: str, config_json: str, nproc: int = 1, resume: str = "latest",
                     nnodes: int = 1, rdzv_endpoint: str | None = None) -> list[str]:
    """The torchrun command line; single node uses --standalone (local rendezvous on a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    return cmd + ["-m", "slip_core.trainer", "--dataset", dataset, "--out", out_dir,
                  "--config-json", config_json, "--resume", resume]


def default_threads(nproc: int, num_workers: int) -> int:
    """Intra-op threads per rank so ranks + loader workers do not oversubscribe the CPU (busy-waiting
    OpenMP threads on an oversubscribed CPU made a step ~8x slower in our measurements)."""
    cpus = os.cpu_count() or 1
    return max(1, (cpus - nproc * num_workers) // nproc)


def run_logged(cmd: list[str], log: Callable[[str], None], timeout_s: float | None = None,
               env: dict | None = None, cwd: str | None = None, kill_grace_s: float = 10.0) -> int:
    """Run `cmd` in its own process group, forward every output line to `log`, kill the group on timeout.
    Returns 0 or raises TrainProcessError (non-zero exit or timeout)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: list[str] = []
    timed_out = threading.Event()

    def killer():
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                timed_out.set()
                _kill_group(proc, kill_grace_s)
                return
            time.sleep(0.2)

    if timeout_s:
        threading.Thread(target=killer, daemon=True).start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-200:]
            log(line)
    finally:
        proc.stdout.close()
        rc = proc.wait()
    if timed_out.is_set():
        raise TrainProcessError(f"training timed out after {timeout_s:.0f}s (process group killed)", rc, tail)
    if rc != 0:
        raise TrainProcessError(f"training exited with code {rc}", rc, tail)
    return rc


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group (torchrun forwards it to the ranks), SIGKILL whatever is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: str, png_path: str, title: str = "") -> None:
    """loss / clip_loss / ssl_loss against step, lr on a second axis (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in recs]
    for key in ("loss", "clip_loss", "ssl_loss"):
        if any(key in r for r in recs):
            ax.plot([r["step"] for r in recs if key in r], [r[key] for r in recs if key in r], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get("lr", 0.0) for r in recs], color="gray", ls="--", lw=1, label="lr")
    ax2.set_ylabel("lr")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
