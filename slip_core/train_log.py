"""Run logs of the trainer: metrics.jsonl (exact across resumes) and optional TensorBoard / W&B."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys

from slip_core import config as cfgmod
from slip_core import storage


class MetricsLog:
    """metrics.jsonl on rank 0, truncated back to the resume step. A local file is appended and flushed per
    record; on an object store (s3://...) the file is rewritten atomically at every checkpoint and at the end."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self.local = path, enabled, storage.is_local(path)
        if not enabled:
            return
        self.lines = []
        if resume_step is not None and storage.exists(path):
            for line in storage.read_text(path).splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        self.lines.append(line)
        self.flush()
        if self.local:
            self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(rec, sort_keys=True)
        if self.local:
            self.f.write(line + "\n")
            self.f.flush()
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if self.enabled and (not self.local or not hasattr(self, "f")):
            storage.atomic_write_text(self.path, "".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        if self.enabled:
            self.f.close() if self.local else self.flush()


class Trackers:
    """Optional TensorBoard / W&B, only when requested and installed."""

    def __init__(self, cfg, out_dir: str, enabled: bool):
        self.tb = self.wb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                print("tensorboard requested but not installed; skipping", file=sys.stderr)
        if cfg.wandb:
            try:
                import wandb

                self.wb = wandb.init(project="slip", dir=out_dir, config=cfgmod.to_dict(cfg),
                                     id=os.path.basename(os.path.abspath(out_dir)), resume="allow")
            except ImportError:
                print("wandb requested but not installed; skipping", file=sys.stderr)

    def log(self, rec: dict, group: str = "train") -> None:
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{group}/{k}", v, rec["step"])
        if self.wb:
            self.wb.log({f"{group}/{k}": v for k, v in scalars.items()} if group != "train" else scalars,
                        step=rec["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
