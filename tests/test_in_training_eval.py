"""Evaluation during pretraining (issue 20): zero-shot / k-NN top-1 on a held-out catalog set as a trainer
step callback, the best checkpoint kept by it, and the eval entry points' --which final|best. Real shards,
real Fashion-MNIST test images, a 2-block 32 px model on CPU (the exact-resume run with evaluation on is in
tests/test_trainer.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from evaluation import common, train_curve
from evaluation.in_training import InTrainingEval, auto_candidates, callbacks_for, choose_dataset, is_due
from evaluation.tasks import EvalConfig, run_task
from slip_core import artifacts
from slip_core import trainer as T
from slip_core.checkpoint import load_checkpoint, load_state
from slip_core.launch import plot_loss_curve
from tests._train_util import fashion_samples, write_dataset

SMALL = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}
EVAL = dict(eval_every_steps=2, eval_dataset="fashion_mnist", eval_max_samples=60, eval_knn_train_samples=100)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("evalds")), fashion_samples(80, seed=5), per_shard=40)


def small_cfg(model="SLIP_VIT_TINY", **kw) -> T.TrainConfig:
    base = dict(model=model, model_overrides=SMALL, epochs=1, samples_per_epoch=80, batch_size=16, lr=2e-3,
                weight_decay=0.1, warmup_epochs=0.2, num_workers=0, log_every=1, ckpt_every=1000,
                shuffle_chunk=40, threads=1, **EVAL)
    return T.TrainConfig(**{**base, **kw})


def records(out) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval_metric" in r]


def due(cfg, steps_per_epoch: int, stop_step: int) -> list[int]:
    return [s for s in range(1, stop_step + 1) if is_due(cfg, s, steps_per_epoch, stop_step)]


def test_when_it_evaluates_and_the_factory():
    paper = T.TRAIN_PRESETS["slip_vitb16_yfcc15m_25ep"]
    tiny = T.TRAIN_PRESETS["tiny"]
    assert due(paper, 3586, 3586 * 25) == [3586 * e for e in range(1, 26)]  # every epoch: the reference's eval_freq
    assert due(tiny, 89, 178) == [45, 89, 134, 178]  # the demo: every half epoch of its 2 x 89 steps
    assert due(small_cfg(eval_every_steps=0, eval_every_epochs=0.1), 10, 20) == list(range(1, 21))  # exact decimals
    assert due(small_cfg(eval_every_steps=0, eval_every_epochs=0.3), 10, 20) == [3, 6, 9, 12, 15, 18, 20]
    assert due(small_cfg(eval_every_steps=7), 5, 20) == [7, 14, 20]  # and at the last step
    assert due(paper, 3586, 100) == [100]  # max_steps cut: the last step still counts
    off = small_cfg(eval_every_steps=0, eval_every_epochs=0)
    assert due(off, 5, 20) == [] and callbacks_for(off) == []
    assert [type(c) for c in callbacks_for(tiny)] == [InTrainingEval]
    with pytest.raises(ValueError, match="eval_every_epochs must be >= 0"):
        small_cfg(eval_every_epochs=-1)
    # auto: ImageNet first (the reference's), downloaded paper sets next, the local sets (Fashion-MNIST first) last
    order = auto_candidates()
    assert order[0] == "imagenet" and order[-3:] == ["fashion_mnist", "mnist", "digits"] and len(set(order)) == len(order)
    assert choose_dataset("auto", None) in order
    with pytest.raises(FileNotFoundError, match="no held-out set for in-training evaluation"):
        choose_dataset("cifar10", "/nonexistent-eval-root")


def test_slip_zero_shot_during_training_keeps_the_best_and_leaves_training_untouched(ds, tmp_path):
    torch.set_num_threads(1)
    cfg = small_cfg()
    T.train(cfg, ds, str(tmp_path / "off"), resume=None)  # same config, no callback: evaluation off
    final = T.train(cfg, ds, str(tmp_path / "on"), resume=None, callbacks=[InTrainingEval(cfg)])
    # RNG-neutral: the run with evaluation trains bit-identically to the one without
    a, b = (load_state(str(tmp_path / d / "checkpoint.pt"))["state_dict"] for d in ("off", "on"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    train_off, _ = records(tmp_path / "off")
    train_on, evals = records(tmp_path / "on")
    assert [r["loss"] for r in train_on] == [r["loss"] for r in train_off]
    # every 2 steps and at the last one, on the 60-image Fashion-MNIST subsample, timed
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(r["eval_metric"] == "zeroshot_top1" and r["eval_dataset"] == "fashion_mnist" and
               r["eval_samples"] == 60 and 0 <= r["zeroshot_top1"] <= 100 and r["eval_seconds"] > 0 for r in evals)
    best = max(evals, key=lambda r: (r["zeroshot_top1"], -r["step"]))
    assert [r["is_best"] for r in evals].count(True) >= 1 and best["is_best"]
    assert (final["best_step"], final["best_metric"], final["best_value"]) == (
        best["step"], "zeroshot_top1", best["zeroshot_top1"])
    extra = load_state(str(tmp_path / "on" / "checkpoint.pt"))["train_state"]["extra"]
    assert extra["best"] == {"step": best["step"], "metric": "zeroshot_top1", "value": best["zeroshot_top1"],
                             "dataset": "fashion_mnist"}
    # one best file kept (pruned at the final checkpoint), copied to checkpoint_best.pt
    assert sorted(n for n in os.listdir(tmp_path / "on" / "checkpoints") if n.startswith("best_")) == [
        f"best_step_{best['step']:08d}.pt"]
    best_path = str(tmp_path / "on" / "checkpoint_best.pt")
    assert load_state(best_path)["best"]["step"] == best["step"]
    # the same code as the eval stage: evaluating checkpoint_best.pt there gives the recorded value
    lm = common.load_model(best_path)
    rec = run_task("zeroshot", lm, "fashion_mnist", EvalConfig(max_samples=60, device="cpu"),
                   cache_dir=str(tmp_path / "cache"))
    assert rec["top1"] == pytest.approx(best["zeroshot_top1"], abs=1e-9) and rec["num_samples"] == 60
    # the loss curve with the evaluation axis, and the report's line
    png = str(tmp_path / "curve.png")
    plot_loss_curve(str(tmp_path / "on" / "metrics.jsonl"), png)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    line = train_curve.summary([*train_on, *evals])
    assert line.startswith(f"best step {best['step']}, zero-shot {best['zeroshot_top1']:.1f}%")


def test_simclr_keeps_the_best_by_knn_top1(ds, tmp_path):
    torch.set_num_threads(1)
    cfg = small_cfg("SIMCLR_VIT_TINY")
    final = T.train(cfg, ds, str(tmp_path), resume=None, callbacks=[InTrainingEval(cfg)])
    _, evals = records(tmp_path)
    assert [r["eval_metric"] for r in evals] == ["knn_top1"] * 3 and not any("zeroshot_top1" in r for r in evals)
    assert final["best_metric"] == "knn_top1" and final["best_value"] == max(r["knn_top1"] for r in evals)
    assert load_checkpoint(str(tmp_path / "checkpoint_best.pt")).config.kind == "simclr"
    assert "k-NN (no text tower)" in train_curve.summary(evals)


def test_missing_eval_set_turns_evaluation_off_and_training_goes_on(ds, tmp_path, capfd):
    torch.set_num_threads(1)
    cfg = small_cfg(eval_dataset="cifar10", eval_data_root=str(tmp_path / "no-eval-data"), samples_per_epoch=32)
    final = T.train(cfg, ds, str(tmp_path / "run"), resume=None, callbacks=[InTrainingEval(cfg)])
    assert "in-training evaluation off: " in capfd.readouterr().err
    assert final["steps"] == 2 and "best_step" not in final
    assert not os.path.exists(tmp_path / "run" / "checkpoint_best.pt") and records(tmp_path / "run")[1] == []


def test_which_picks_final_or_best_of_a_checkpoint_artifact(ds, tmp_path):
    torch.set_num_threads(1)
    cfg = small_cfg(samples_per_epoch=32)
    T.train(cfg, ds, str(tmp_path / "run"), resume=None, callbacks=[InTrainingEval(cfg)])
    with_best, without = str(tmp_path / "run"), str(tmp_path / "nobest")
    artifacts.publish(artifacts.build_manifest(with_best, ["checkpoint.pt", "checkpoint_best.pt"], kind="checkpoint",
                                               name="t"), with_best)
    os.makedirs(without)
    os.link(os.path.join(with_best, "checkpoint.pt"), os.path.join(without, "checkpoint.pt"))
    artifacts.publish(artifacts.build_manifest(without, ["checkpoint.pt"], kind="checkpoint", name="t"), without)
    assert common.resolve_checkpoint(with_best)[0].endswith("/checkpoint.pt")
    assert common.resolve_checkpoint(with_best, "best")[0].endswith("/checkpoint_best.pt")
    said = []
    assert common.resolve_checkpoint(without, "best", log=said.append)[0].endswith("/checkpoint.pt")
    assert "no checkpoint_best.pt" in said[0]
    with pytest.raises(ValueError, match="which must be one of final, best"):
        common.resolve_checkpoint(with_best, "last")
    with pytest.raises(ValueError, match="which 'last'"):
        EvalConfig(which="last")
