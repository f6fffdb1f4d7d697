"""bench/gpu_check.sh, the prepared device check: syntax, argument handling, the plan, its behaviour on a machine
without CUDA, and the Python stages it runs (train with resume, eval) exercised on the CPU at tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_syntax_help_and_bad_arguments():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    help_ = run("--help")
    assert help_.returncode == 0 and all(s in help_.stdout for s in ("env", "step", "train", "eval", "nccl"))
    for bad, why in ((["--bogus"], "unknown argument"), (["--skip", "train,warp"], "unknown stage 'warp'"),
                     (["--out"], "--out needs"), (["--wheels", "/nonexistent/wheels"], "not a directory")):
        p = run(*bad)
        assert p.returncode == 2 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, (bad, p.stderr)


def test_dry_run_plans_every_stage(tmp_path):
    p = run("--dry-run", "--out", str(tmp_path), "--skip", "nccl")
    assert p.returncode == 0, p.stderr
    recs = records(p.stdout)
    assert [r["name"] for r in recs] == ["gpu_check_plan"] + [f"gpu_check_{s}" for s in ("env", "step", "train", "eval", "nccl")]
    assert recs[0]["python"].endswith("python") and [r["status"] for r in recs[1:]] == ["planned"] * 4 + ["skipped"]
    assert not (tmp_path / "gpu_check.jsonl").exists()  # a plan writes no results


def test_without_cuda_reports_the_environment_and_skips_gpu_stages(tmp_path):
    p = run("--out", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    recs = records(p.stdout)
    env = recs[0]
    assert env["name"] == "gpu_check_env" and env["cuda"] is False and env["torch"] and env["open_clip"]
    assert [(r["name"], r["status"]) for r in recs[1:]] == [(f"gpu_check_{s}", "skipped") for s in ("step", "train", "eval", "nccl")]
    assert records((tmp_path / "gpu_check.jsonl").read_text()) == recs


@pytest.mark.slow
def test_python_stages_on_cpu(tmp_path):
    """The stages the GPU run depends on, at 2 steps on the CPU: training with the cut-and-resume check, then
    zero-shot and linear probe of its checkpoint (a missing set is reported, not fatal)."""
    driver = [sys.executable, str(REPO / "bench" / "gpu_check.py")]
    train = subprocess.run(driver + ["train", "--out", str(tmp_path / "train"), "--steps", "2", "--device", "cpu",
                                     "--workers", "0"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    rec = [r for r in records(train.stdout) if r.get("name") == "gpu_train_resume"][0]
    assert rec["steps"] == 2 and rec["resume_bit_identical"] is True and rec["global_batch"] == 32
    ev = subprocess.run(driver + ["eval", "--out", str(tmp_path), "--checkpoint", rec["checkpoint"], "--device", "cpu",
                                  "--sets", "digits,not_a_set"], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = {(r["name"], r["dataset"]): r for r in records(ev.stdout)}
    for task in ("zeroshot", "linear"):
        assert got[(f"gpu_eval_{task}", "digits")]["status"] == "ok"
        assert 0 <= got[(f"gpu_eval_{task}", "digits")]["value"] <= 100
        assert got[(f"gpu_eval_{task}", "not_a_set")]["status"] == "skipped"
    bad = subprocess.run(driver + ["train", "--out", str(tmp_path / "x"), "--steps", "1"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps must be >= 2" in bad.stderr
