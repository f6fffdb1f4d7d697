"""Linear probe: the fast path is reproducible and the trained model's features beat random-init features;
the reference MoCo v3 recipe runs with the intended lr, keeps the backbone frozen and learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets import catalog
from evaluation import common, linear_probe
from tests._eval_util import random_checkpoint, tiny_checkpoint

torch.set_num_threads(1)  # 2 shared cores: busy-waiting intra-op threads slow everything down


def _splits(size: int, n_train: int, n_test: int, name: str = "fashion_mnist"):
    catalog.ensure(name)
    tf = common.probe_eval_transform(size)
    return (catalog.load(name, "train", tf, max_samples=n_train, seed=0),
            catalog.load(name, "test", tf, max_samples=n_test, seed=0))


def test_fast_probe_reproducible_and_beats_random_features(tmp_path):
    torch.set_num_threads(1)
    lm = common.load_model(tiny_checkpoint()["path"])
    rand = common.load_model(random_checkpoint())
    train, test = _splits(64, 2000, 1000)
    first = linear_probe.fast_probe(lm, train, test, cache_dir=str(tmp_path / "a"))
    second = linear_probe.fast_probe(lm, train, test, cache_dir=str(tmp_path / "b"))  # recomputed from scratch
    baseline = linear_probe.fast_probe(rand, train, test, cache_dir=str(tmp_path / "a"))
    print(f"\nlinear probe fashion_mnist (2000 train / 1000 test): trained {first['value']:.1f}% "
          f"(C={first['best_C']})  random-init features {baseline['value']:.1f}% (C={baseline['best_C']})")
    assert first["value"] == second["value"] and first["best_C"] == second["best_C"]
    assert first["val_scores"] == second["val_scores"]
    assert first["value"] > baseline["value"] + 3.0
    assert first["value"] > 60.0
    assert first["best_C"] in linear_probe.FastProbeConfig().Cs and len(first["val_scores"]) == 5


def test_fit_logistic_chooses_regularisation_on_held_out_split():
    rng = np.random.default_rng(0)
    # 2 informative dims + 200 noise dims, few samples: strong regularisation must win on the held-out split
    n, d = 120, 200
    y = rng.integers(0, 2, n)
    x = np.concatenate([y[:, None] * 2.0 + rng.normal(size=(n, 2)), rng.normal(size=(n, d))], axis=1)
    yt = rng.integers(0, 2, 400)
    xt = np.concatenate([yt[:, None] * 2.0 + rng.normal(size=(400, 2)), rng.normal(size=(400, d))], axis=1)
    res = linear_probe.fit_logistic(x, y, xt, yt, "top1")
    assert res["best_C"] <= 0.1, res["val_scores"]
    assert res["val_scores"][str(res["best_C"])] == max(res["val_scores"].values())
    assert res["val_scores"][str(res["best_C"])] > res["val_scores"]["10.0"]  # beats the weakest regularisation
    assert res["value"] > 65.0  # chance 50


def test_reference_recipe_intended_lr_frozen_backbone_learns():
    torch.set_num_threads(1)
    cfg = linear_probe.ReferenceProbeConfig()
    assert cfg.lr == pytest.approx(0.4)  # 0.1 x 1024 / 256, not the released script's 0.00625 (SPEC §9.6)
    lm = common.load_model(tiny_checkpoint()["path"])
    catalog.ensure("fashion_mnist")
    train = catalog.load("fashion_mnist", "train", linear_probe.RandomResizedCropFlip(64, seed=0), max_samples=512)
    test = catalog.load("fashion_mnist", "test", common.probe_eval_transform(64), max_samples=300)
    small = linear_probe.ReferenceProbeConfig(epochs=3, batch_size=64, eval_every=3, num_workers=0)
    res = linear_probe.reference_probe(lm, train, test, small, log=lambda s: None)
    print(f"\nreference linear probe, 3 epochs x 512 images: {res['value']:.1f}% (lr {res['lr']})")
    assert res["lr"] == pytest.approx(0.025) and len(res["history"]) == 1  # 0.1 x 64 / 256
    assert res["value"] > 30.0  # chance 10
