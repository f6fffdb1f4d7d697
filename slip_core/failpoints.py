"""Named crash points for the reliability suite: places where a test can make the process SIGKILL itself.

Why: a crash test must land its kill at a chosen step (after shard k of a repack is closed, after the ledger
is written but before the manifest). A kill timed from outside can only aim at steps that last long enough
to be seen by polling; a named point in the code hits any step, every time. Same idea as etcd's gofail.

Production code marks a step with `failpoint("stage.step")`. It does nothing unless the environment
variable SLIP_FAILPOINTS names that point (comma-separated; `NAME:N` fires on the N-th time it is reached;
`@TERM` sends SIGTERM instead, as a graceful stop from outside would arrive at that moment):

    SLIP_FAILPOINTS=publish.shard_closed:2     # die when the second output shard has been closed
    SLIP_FAILPOINTS=eval.result:1@TERM         # SIGTERM once the first eval result is recorded

The variable is read once, at import (a test sets it for the subprocess it starts), so an unarmed point
costs one call and one test of an empty dict. SIGKILL, not an exception: nothing runs after it (no
`finally`, no atexit, no flush), exactly like the OOM killer or a lost node.

Points (grep `failpoint(` for the code):
    filter.batch_written       datasets/sources/yfcc.py  a batch of caption rows written, the parquet not yet closed
    dataset.table_published    datasets/pipeline.py  caption-table artifact published, nothing downloaded
    dataset.group_downloaded   datasets/pipeline.py  an img2dataset group finished, the next not started
    publish.sample_written     datasets/publish.py  a sample appended to the open output shard
    publish.shard_closed       datasets/publish.py  an output shard closed and renamed into place
    publish.before_manifest    datasets/publish.py  shards, ledger, sizes and stats written, no manifest yet
    pretrain.files_copied      flows/pretrain.py  checkpoint files copied into the artifact, no manifest yet
    eval.result                flows/evaluate.py  one (task, dataset) result computed and recorded by Prefect
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "SLIP_FAILPOINTS"


SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


def parse(spec: str) -> dict[str, tuple[int, int]]:
    """'a,b:3@TERM' -> {'a': (1, SIGKILL), 'b': (3, SIGTERM)}: the hit on which each armed point fires, and how."""
    armed: dict[str, tuple[int, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, at, sig = item.partition("@")
        name, _, nth = point.partition(":")
        if not name or (nth and not (nth.isdigit() and int(nth) >= 1)) or (at and sig not in SIGNALS):
            raise ValueError(f"{ENV}: bad entry {item!r}; expected NAME[:N][@KILL|@TERM] with N >= 1")
        armed[name] = (int(nth or 1), SIGNALS[sig or "KILL"])
    return armed


_ARMED = parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()  # Prefect runs tasks in threads


def failpoint(name: str) -> None:
    """Signal this process if `name` is armed and this is the hit it is armed for; otherwise nothing."""
    if not _ARMED or name not in _ARMED:
        return
    with _lock:
        n = _hits[name] = _hits.get(name, 0) + 1
    nth, sig = _ARMED[name]
    if n == nth:
        os.write(2, f"failpoint {name} (hit {n}): {signal.Signals(sig).name}\n".encode())  # unbuffered: survives the kill
        os.kill(os.getpid(), sig)
