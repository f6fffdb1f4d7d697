"""flows.pretrain against the session's real Prefect server: torchrun subprocess, artifact, caching, failures."""
from __future__ import annotations

import json
import os
import time

import pytest

from slip_core import artifacts
from slip_core.checkpoint import load_checkpoint
from slip_core.launch import TrainProcessError
from tests._train_util import fashion_samples, photo_samples, write_dataset

pytestmark = pytest.mark.prefect

SMALL_RUN = {"model_overrides": {"image_size": 32, "vision_depth": 2, "transformer_layers": 1,
                                 "ssl_mlp_dim": 64, "ssl_emb_dim": 32},
             "epochs": 1, "samples_per_epoch": 96, "batch_size": 16, "num_workers": 1, "log_every": 1,
             "ckpt_every": 3, "warmup_epochs": 0.5, "shuffle_chunk": 30}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("flowds"))
    return write_dataset(root, fashion_samples(100, seed=4) + photo_samples(short_side=64), per_shard=30)


def test_pretrain_flow_publishes_and_caches(prefect_server, ds, tmp_path):
    from prefect.artifacts import Artifact

    from flows.pretrain import pretrain

    store = str(tmp_path / "store")
    t0 = time.time()
    url = pretrain(dataset=ds, store=store, config=SMALL_RUN, preset="tiny", nproc=1, retries=0)
    first = time.time() - t0
    m = artifacts.load_verified(url)
    assert m.kind == "checkpoint" and {f.path for f in m.files} == {
        "checkpoint.pt", "checkpoint_best.pt", "metrics.jsonl", "loss_curve.png", "config.json", "final_metrics.json"}
    assert m.upstream["dataset"].sha256 == artifacts.load_manifest(ds).sha256
    assert m.config["model_overrides"]["image_size"] == 32 and m.config["nproc"] == 1
    assert m.metrics["steps"] == 6 and m.metrics["world_size"] == 1
    root = artifacts.artifact_root(url)
    recs = [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl"))]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # the tiny preset evaluates zero-shot every half epoch (evaluation.train_entry): steps 3 and 6; the
    # artifact publishes the best step's weights with its step and value
    evals = [r for r in recs if "eval_metric" in r]
    assert [(r["step"], r["eval_metric"], r["eval_dataset"]) for r in evals] == [
        (3, "zeroshot_top1", "fashion_mnist"), (6, "zeroshot_top1", "fashion_mnist")]
    best = max(evals, key=lambda r: (r["zeroshot_top1"], -r["step"]))
    assert (m.metrics["best_step"], m.metrics["best_value"]) == (best["step"], best["zeroshot_top1"])
    assert load_checkpoint(os.path.join(root, "checkpoint_best.pt")).config.kind == "slip"
    with open(os.path.join(root, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(os.path.join(root, "checkpoint.pt")).config.kind == "slip"
    assert not os.path.exists(os.path.join(root, "run"))  # resume state cleaned up after publish
    art = Artifact.get("pretrain-slip-vit-tiny")
    assert art is not None and "data:image/png;base64," in art.data and "steps" in art.data

    t0 = time.time()
    again = pretrain(dataset=ds, store=store, config=SMALL_RUN, preset="tiny", nproc=1, retries=0)
    assert again == url and time.time() - t0 < first / 2  # cached: no torchrun

    changed = pretrain(dataset=ds, store=store, config={**SMALL_RUN, "lr": 1e-4}, preset="tiny", nproc=1, retries=0)
    assert changed != url and artifacts.load_verified(changed).config["lr"] == 1e-4


def test_pretrain_flow_surfaces_failures(prefect_server, ds, tmp_path):
    from flows.pretrain import make_config, pretrain

    store = str(tmp_path / "store")
    with pytest.raises(TrainProcessError, match="exited with code 1"):  # non-finite loss -> exit 1 -> task fails
        pretrain(dataset=ds, store=store, config={**SMALL_RUN, "lr": 1e12, "start_lr": 1e12, "warmup_epochs": 0},
                 preset="tiny", retries=0)
    t0 = time.time()
    with pytest.raises(TrainProcessError, match="timed out"):
        pretrain(dataset=ds, store=store, config={**SMALL_RUN, "epochs": 1000}, preset="tiny", retries=0,
                 timeout_s=4)
    assert time.time() - t0 < 40  # the process group was killed, not waited for
    with pytest.raises(Exception, match="unknown field"):
        make_config("tiny", {"lrr": 1})
