"""Stop requests: a signal (SLURM's pre-emption warning, a forwarded kill) or a step callback asks the trainer to
checkpoint at the next optimizer-step boundary and exit with 143, so the launcher requeues or retries.

SLURM delivers the warning to the trainer processes themselves: infra/slurm_train.sbatch starts one task per
GPU with srun and asks for `--signal=USR1@120` (no `B:`), so slurmstepd signals every task of the job step
120 s before the time limit; the batch shell requeues the job when the step exits with 143. Under torchrun,
SIGTERM reaches the ranks (torchrun forwards it). Loader workers ignore both (slip_core/data.py): the ranks
decide. Ranks agree through an all-reduce of their flags, so all of them stop at the same step.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what launchers read as "stopped by a signal, not finished"


class Preempted(RuntimeError):
    """Stopped on request after checkpointing; the CLI exits 143 so launchers retry / requeue."""


class StopRequest:
    """Catches STOP_SIGNALS while training (restore() puts the previous handlers back)."""

    def __init__(self):
        self.reason: str | None = None
        self.previous = {}
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handler(self, signum, frame) -> None:
        self.reason = f"signal {signal.Signals(signum).name}"

    def request(self, reason: str) -> None:
        """A stop asked for by code (a step callback: lease lost, parent gone, ...)."""
        self.reason = self.reason or reason

    def should_stop(self, device: torch.device) -> bool:
        """Collective under torch.distributed: True on every rank when any rank was asked to stop."""
        if not dist.is_initialized():
            return self.reason is not None
        flag = torch.tensor([float(self.reason is not None)],
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
