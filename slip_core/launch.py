"""Launch the trainer under torchrun as a subprocess, and summarise a finished run (loss curve).

Used by flows/pretrain.py, but free of Prefect: the caller passes a log callback. A subprocess (not an
in-process call) because a Prefect task running in a worker thread cannot be interrupted (ENVIRONMENT.md
§1.7): we enforce the timeout ourselves, and report the exit code so the caller can raise and let retries
apply. The child is started through slip_core.procs, so it (and, through the trainer's own parent
watchdog, torchrun's ranks) ends when this process does, however it dies.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Callable

from slip_core import procs


class TrainProcessError(RuntimeError):
    def __init__(self, msg: str, returncode: int | None, tail: list[str]):
        super().__init__(msg + ("\n--- last output ---\n" + "\n".join(tail[-30:]) if tail else ""))
        self.returncode = returncode


def torchrun_command(dataset: str, out_dir: str, config_json: str, nproc: int = 1, resume: str = "latest",
                     nnodes: int = 1, rdzv_endpoint: str | None = None, published: str | None = None) -> list[str]:
    """The torchrun command line; single node uses --standalone (local rendezvous on a free port).
    `published`: the manifest URL of the artifact the run is for; the trainer stops at once if it appears."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    return cmd + ["-m", TRAINER_MODULE, *trainer_args(dataset, out_dir, config_json, resume, published)]


TRAINER_MODULE = "slip_core.trainer"


def trainer_args(dataset: str, out_dir: str, config_json: str, resume: str = "latest",
                 published: str | None = None) -> list[str]:
    """The trainer's arguments (`python -m slip_core.trainer ARGS`), whichever launcher starts its ranks."""
    return ["--dataset", dataset, "--out", out_dir, "--config-json", config_json, "--resume", resume] + (
        ["--published", published] if published else [])


def default_threads(nproc: int, num_workers: int) -> int:
    """Intra-op threads per rank so ranks + loader workers do not oversubscribe the CPU (busy-waiting
    OpenMP threads on an oversubscribed CPU made a step ~8x slower in our measurements)."""
    cpus = os.cpu_count() or 1
    return max(1, (cpus - nproc * num_workers) // nproc)


def run_logged(cmd: list[str], log: Callable[[str], None], timeout_s: float | None = None,
               env: dict | None = None, cwd: str | None = None, kill_grace_s: float = 30.0) -> int:
    """Run `cmd` (slip_core.procs.spawn: it dies with us), forward every output line to `log`, stop it on
    timeout. Returns 0 or raises TrainProcessError (non-zero exit or timeout).

    Stopping is SIGTERM first (torchrun forwards it, the trainer checkpoints at the step boundary and exits
    143), SIGKILL of its process group after `kill_grace_s`. Any exception here, SIGTERM arriving in this
    thread as Prefect's TerminationSignal included, stops the child the same way before it propagates."""
    proc = procs.spawn(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    done, timed_out = threading.Event(), threading.Event()

    def killer():  # signals only; this thread below does all the waiting and reaping
        if done.wait(timeout_s):
            return
        timed_out.set()
        procs.signal_group(proc, signal.SIGTERM)
        if not done.wait(kill_grace_s):
            procs.signal_group(proc, signal.SIGKILL)

    if timeout_s:
        threading.Thread(target=killer, daemon=True).start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-200:]
            log(line)
        rc = procs.wait(proc)
    except BaseException:
        done.set()
        procs.terminate(proc, kill_grace_s)
        raise
    finally:
        done.set()
        proc.stdout.close()
    if timed_out.is_set():
        raise TrainProcessError(f"training timed out after {timeout_s:.0f}s (stopped: SIGTERM, then SIGKILL)", rc, tail)
    if rc != 0:
        raise TrainProcessError(f"training exited with code {rc}", rc, tail)
    return rc


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


EVAL_METRIC = "eval_metric"  # in-training evaluation records of metrics.jsonl name their metric under this key


def best_eval(recs: list[dict]) -> dict | None:
    """The in-training evaluation record with the highest value (the earliest on a tie), or None."""
    evals = [r for r in recs if EVAL_METRIC in r]
    return max(evals, key=lambda r: (r[r[EVAL_METRIC]], -r["step"])) if evals else None


def plot_loss_curve(metrics_path: str, png_path: str, title: str = "") -> None:
    """loss / clip_loss / ssl_loss against step; the in-training evaluation (zero-shot or k-NN top-1) on a
    second axis with its best step marked, when there is one; lr on an outer axis (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if EVAL_METRIC in r]
    fig, ax = plt.subplots(figsize=(8 if evals else 7, 4.6), dpi=100)
    for key in ("loss", "clip_loss", "ssl_loss"):
        if any(key in r for r in train):
            ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax_lr = ax.twinx()
    ax_lr.plot([r["step"] for r in train], [r.get("lr", 0.0) for r in train], color="gray", ls="--", lw=1, label="lr")
    ax_lr.set_ylabel("lr")
    handles = [ax.get_legend_handles_labels(), ax_lr.get_legend_handles_labels()]
    if evals:
        metric, best = evals[-1][EVAL_METRIC], best_eval(recs)
        ax_lr.spines["right"].set_position(("axes", 1.14))
        ax_ev = ax.twinx()
        ax_ev.plot([r["step"] for r in evals], [r[r[EVAL_METRIC]] for r in evals], "o-", color="tab:red",
                   label=f"{metric} ({evals[-1].get('eval_dataset', '')}, %)")
        ax_ev.plot([best["step"]], [best[metric]], "*", color="gold", ms=16, mec="black",
                   label=f"best: step {best['step']}, {best[metric]:.1f}%")
        ax_ev.set_ylabel(f"{metric} (%)")
        handles.append(ax_ev.get_legend_handles_labels())
    ax.legend([h for hs, _ in handles for h in hs], [lab for _, labs in handles for lab in labs],
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
