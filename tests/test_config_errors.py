"""Invalid configuration through the real `slip` CLI: every stage rejects it before any work starts,
with exit status 2 and one line naming the field — never a traceback from deep inside a run."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flows import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (argv, what the message must say, short label for the fault table)
CASES = [
    (["train", "--dataset", "/nonexistent", "--set", "lr=abc"], "TrainConfig.lr: expected float, got 'abc'",
     "wrong type (lr=abc)"),
    (["train", "--dataset", "/nonexistent", "--set", "epochs=2.5"], "TrainConfig.epochs: expected int, got 2.5",
     "float for an int field (epochs=2.5)"),
    (["train", "--dataset", "/nonexistent", "--set", "lerning_rate=0.1"], "unknown field(s) ['lerning_rate']",
     "misspelled key"),
    (["train", "--dataset", "/nonexistent", "--set", "batch_size=0"], "batch_size must be >= 1, got 0",
     "out-of-range value (batch_size=0)"),
    (["train", "--dataset", "/nonexistent", "--set", "model=VIT_HUGE_NOPE"], "model 'VIT_HUGE_NOPE' is not a preset",
     "unknown model name"),
    (["train", "--dataset", "/nonexistent", "--preset", "nosuch"], "unknown training preset 'nosuch'",
     "unknown preset"),
    (["train", "--dataset", "/nonexistent", "--set", "lr"], "--set expects KEY=VALUE, got 'lr'",
     "--set without '='"),
    (["eval", "run", "--checkpoint", "/nonexistent.pt", "--set", "zeroshot=3"], "EvalConfig.zeroshot: expected list[str], got 3",
     "eval setting of the wrong type"),
    (["dataset", "build", "/nonexistent.tsv", "--store", "/nonexistent-store", "--set", "timeout=soon"],
     "DatasetConfig.timeout: expected int, got 'soon'", "dataset setting of the wrong type"),
    (["dataset", "build", "/nonexistent.tsv", "--store", "/nonexistent-store", "--preset", "yfcc99m"],
     "unknown dataset preset 'yfcc99m'", "unknown dataset preset"),
    (["dataset", "build", "/nonexistent.tsv", "--store", "/nonexistent-store", "--set", "thread_count=0"],
     "DatasetConfig.thread_count must be >= 1, got 0", "out-of-range dataset setting (thread_count=0)"),
    (["dataset", "build", "/nonexistent.tsv", "--store", "/nonexistent-store", "--set", "quality=lenient"],
     "unknown quality preset 'lenient'", "unknown quality preset"),
]


@pytest.mark.parametrize("argv,message,label", CASES, ids=[c[2] for c in CASES])
def test_invalid_config_exits_2_with_the_field_named(argv, message, label, capsys, fault_log):
    t0 = time.time()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert time.time() - t0 < 30
    fault_log.record("input", "config", f"invalid config for `slip {argv[0]}`: {label}",
                     f"exit 2 before any work, message: {message}", bound="< 30 s")


def test_cli_process_prints_one_line_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--dataset", "/nonexistent", "--set",
                          "precision=fp8"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "slip train: invalid configuration: TrainConfig: precision must be auto|bf16|fp16|fp32, got 'fp8'"]
