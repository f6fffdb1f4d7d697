"""Console progress of long stages: a tqdm bar (rate, ETA) on an interactive terminal, short human lines otherwise.

Used by the dataset download (per shard group), training (per logged step) and evaluation (per dataset).
Raw records stay in files (metrics.jsonl, results.json): the console gets `Progress` lines such as

    train: 40/178 steps (22%) · loss 5.384 · 21.4 samples/s · ETA 1m12s

Training runs in a torchrun subprocess whose stdout is a pipe, so the trainer always prints such lines
(`step_line`); the launching process hands each line to `relay`, which on a terminal turns the trainer's
step lines into a bar (`parse_step_line` reads them back: this module is the one place that knows the
format) and passes every other line on. Interactive = the stream is a TTY, unless SLIP_PROGRESS=lines.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Callable, TextIO

STEP_LINE = re.compile(r"^train: (\d+)/(\d+) steps \(\d+%\)(.*)$")
MIN_LINE_INTERVAL_S = 0.0  # non-interactive: a line per update (callers choose how often they update)


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("SLIP_PROGRESS", "").lower() == "lines":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _size(stream: TextIO) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (OSError, ValueError, AttributeError):
        return 0, 0


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _stats_text(stats: dict) -> str:
    parts = []
    for k, v in stats.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "".join(f" · {p}" for p in parts)


class Progress:
    """`update(n, **stats)` after each unit of work; `close()` at the end (or use as a context manager).

    Interactive: a tqdm bar on `stream` with `stats` as its postfix. Otherwise: one line per update through
    `log` (default: print to `stream`), `desc: done/total unit (pct%) · stats · rate · ETA`."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", log: Callable[[str], None] | None = None,
                 stream: TextIO | None = None, initial: int = 0):
        self.desc, self.total, self.unit, self.done = desc, total, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        self.t0, self.start_count, self.last_line = time.monotonic(), initial, 0.0
        self.bar = None
        if interactive(self.stream):
            from tqdm import tqdm

            size = _size(self.stream)  # a terminal that reports no size (a bare pty): 100 × 24, or tqdm hides the bar
            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, leave=True,
                            dynamic_ncols=all(size), ncols=None if all(size) else 100, nrows=None if all(size) else 24)

    def rate(self) -> float | None:
        dt = time.monotonic() - self.t0
        return (self.done - self.start_count) / dt if dt > 0 and self.done > self.start_count else None

    def line(self, stats: dict | None = None, eta_s: float | None = None) -> str:
        total = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done // self.total}%)" if self.total else ""
        rate = self.rate()
        if eta_s is None and rate and self.total:
            eta_s = (self.total - self.done) / rate
        tail = f" · ETA {format_eta(eta_s)}" if self.total and self.done < self.total else ""
        return f"{self.desc}: {self.done}{total} {self.unit}{pct}{_stats_text(stats or {})}{tail}"

    def update(self, n: int = 1, **stats) -> None:
        self.done += n
        if self.bar is not None:
            if stats:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()
                                      if v is not None}, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= MIN_LINE_INTERVAL_S or (self.total and self.done >= self.total):
            self.last_line = now
            self.log(self.line(stats))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ training
def step_line(step: int, total: int, loss: float | None, samples_per_s: float | None, eta_s: float | None) -> str:
    """The trainer's console line for a logged step (its metrics.jsonl record holds the rest)."""
    stats = {"loss": None if loss is None else round(float(loss), 4), "samples/s": samples_per_s}
    eta = f" · ETA {format_eta(eta_s)}" if step < total else ""
    return f"train: {step}/{total} steps ({100 * step // max(total, 1)}%){_stats_text(stats)}{eta}"


def parse_step_line(line: str) -> tuple[int, int, dict] | None:
    """(step, total, {"loss": .., "samples/s": ..}) of a `step_line`, or None for any other line."""
    m = STEP_LINE.match(line.strip())
    if not m:
        return None
    stats = {}
    for part in m.group(3).split(" · "):
        key, _, value = part.strip().rpartition(" ")
        if key in ("loss", "samples/s"):
            try:
                stats[key] = float(value)
            except ValueError:
                pass
    return int(m.group(1)), int(m.group(2)), stats


def relay(log: Callable[[str], None], stream: TextIO | None = None) -> Callable[[str], None]:
    """A line callback for the trainer's output: on an interactive `stream` the step lines drive a bar
    (closed at the last step) and everything else goes to `log`; otherwise every line goes to `log`."""
    if not interactive(stream):
        return log
    state: dict = {}

    def feed(line: str) -> None:
        parsed = parse_step_line(line)
        if parsed is None:
            log(line)
            return
        step, total, stats = parsed
        bar = state.get("bar")
        if bar is None or bar.total != total or step < bar.done:  # first step line, or a restarted run
            if bar is not None:
                bar.close()
            bar = state["bar"] = Progress("train", total, "steps", log=log, stream=stream, initial=step)
        else:
            bar.update(step - bar.done, **stats)
        if step >= total:
            bar.close()

    return feed
