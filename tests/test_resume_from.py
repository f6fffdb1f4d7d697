"""`slip train --resume-from`: continue training from another identity's checkpoint on purpose (issue 16, item 3).

A run under one identity is interrupted after 2 of 4 steps (its run folder keeps checkpoints/latest); the same
data with a different config (another identity) is then trained with `--resume-from` that run folder through
the real CLI, Prefect flow and torchrun. It continues at step 3 instead of starting over, ends with the same
weights as an uninterrupted run (exact resume: same data position and RNG state), and records the checkpoint
it started from in the manifest's lineage as `resumed_from`.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from flows import cli
from slip_core import artifacts, storage
from tests._stage_runs import TRAIN_SETS, sets
from tests._train_util import fashion_samples, write_dataset

pytestmark = pytest.mark.prefect


def _train_alone(cfg_overrides: dict, dataset: str, out: str) -> None:
    from flows.pretrain import make_config
    from slip_core.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_config("tiny", cfg_overrides), dataset, out)
    finally:
        torch.set_num_threads(threads)


def test_resume_from_continues_a_run_of_another_identity(prefect_server, tmp_path, capsys, monkeypatch):
    from slip_core.checkpoint import load_state
    from slip_core.train_state import latest_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's ranks compute like the single-thread references

    ds = write_dataset(str(tmp_path / "dataset"), fashion_samples(80, seed=7), per_shard=40)
    old = str(tmp_path / "old-run")
    _train_alone({**TRAIN_SETS, "max_steps": 2}, ds, old)  # an interrupted run: 2 of its 4 steps done
    step2 = latest_checkpoint(old)
    assert step2.endswith("step_00000002.pt")
    _train_alone(TRAIN_SETS, ds, str(tmp_path / "uninterrupted"))

    store = str(tmp_path / "store")
    argv = ["train", "--dataset", ds, "--store", store, "--preset", "tiny", "--retries", "0", *sets(TRAIN_SETS)]
    # weights without a train state (optimizer, data position): refused before Prefect starts, with the reason
    weights = str(tmp_path / "weights.pt")
    torch.save({"state_dict": load_state(step2)["state_dict"]}, weights)
    assert cli.main(argv + ["--resume-from", weights]) == 2
    assert "not a resume checkpoint (no train_state" in capsys.readouterr().err

    assert cli.main(argv + ["--resume-from", old]) == 0
    url = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    m = artifacts.load_verified(url)
    up = m.upstream["resumed_from"]
    assert up.kind == artifacts.RESUME_KIND and up.sha256 == storage.sha256_file(step2) and up.url == step2
    root = artifacts.artifact_root(url)
    recs = [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl"))]
    old_steps = [json.loads(line) for line in open(os.path.join(old, "metrics.jsonl"))]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4] and m.metrics["steps"] == 4
    # the flow's trainer evaluates during training (tiny: every half epoch); the old run (no evaluation) had
    # no step-2 evaluation, so the continued run evaluates step 4 only, and keeps it as the best
    assert [r["step"] for r in recs if "eval_metric" in r] == [4] and m.metrics["best_step"] == 4
    assert [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl"))][:2] == old_steps[:2]
    got = load_state(os.path.join(root, "checkpoint.pt"))["state_dict"]
    ref = load_state(str(tmp_path / "uninterrupted" / "checkpoint.pt"))["state_dict"]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert f"resumed_from: checkpoint file sha256 {up.sha256[:12]}" in artifacts.format_lineage(url)

    # the same identity again: already trained, --resume-from has nothing left to do
    assert cli.main(argv + ["--resume-from", old]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"] == url


def test_out_is_a_deprecated_alias_of_store(capsys):
    args = cli.build_parser("train").parse_args(["train", "--dataset", "d", "--out", "/somewhere"])
    assert cli.store_of(args) == "/somewhere"
    assert "--out is deprecated, use --store" in capsys.readouterr().err
    args = cli.build_parser("train").parse_args(["train", "--dataset", "d"])
    assert cli.store_of(args) == args.store_default
