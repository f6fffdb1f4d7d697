"""Zero-shot: the classifier construction (SPEC §7) and a tiny CLIP trained on captioned real images beating
chance on held-out Fashion-MNIST TEST images; the CLI on a released-SLIP-format checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import catalog
from evaluation import common, zeroshot
from slip_core.registry import build_model
from slip_core.tokenizer import tokenize
from tests._eval_util import random_checkpoint, tiny_checkpoint

torch.set_num_threads(1)  # 2 shared cores: busy-waiting intra-op threads slow everything down

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_text_classifier_is_renormalised_mean_over_templates_and_synonyms():
    torch.manual_seed(0)
    model = build_model("CLIP_VIT_TINY", context_length=16).eval()
    templates = ["a photo of a {}.", "a {}."]
    classes = ["cat", ["dog", "puppy"]]
    w = zeroshot.text_classifier(model, classes, templates, batch_size=3)  # batches cross class boundaries
    with torch.no_grad():
        def cls(texts):
            e = F.normalize(model.encode_text(tokenize(texts, context_length=16)), dim=-1).mean(0)
            return F.normalize(e, dim=0)
        expect = torch.stack([cls(["a photo of a cat.", "a cat."]),
                              cls(["a photo of a dog.", "a dog.", "a photo of a puppy.", "a puppy."])])
    assert torch.allclose(w, expect, atol=1e-5)
    assert torch.allclose(w.norm(dim=1), torch.ones(2), atol=1e-5)


def test_simclr_has_no_zero_shot():
    with pytest.raises(zeroshot.NotApplicable):
        zeroshot.text_classifier(build_model("SIMCLR_VIT_TINY"), ["a"], ["{}"])


def test_trained_tiny_clip_beats_chance_on_held_out_images(tmp_path):
    info = tiny_checkpoint()
    assert info["last_loss"] < info["first_loss"] - 0.3, info
    lm = common.load_model(info["path"])
    rand = common.load_model(random_checkpoint())
    catalog.ensure("fashion_mnist")
    test = catalog.load("fashion_mnist", "test", common.zeroshot_transform(64), max_samples=2000, seed=0)
    res = zeroshot.evaluate(lm, test, cache_dir=str(tmp_path))
    res_rand = zeroshot.evaluate(rand, test, cache_dir=str(tmp_path))
    print(f"\nzero-shot fashion_mnist test (2000 held-out): trained {res['value']:.1f}%  "
          f"random-init {res_rand['value']:.1f}%  chance {res['chance']:.1f}%  (fixture {info})")
    assert res["num_samples"] == 2000 and res["chance"] == 10.0
    assert res["value"] > 30.0, res  # 3x chance on images the model never saw
    assert res["value"] > res_rand["value"] + 15.0
    # cached per (checkpoint sha256, dataset, templates): the second call reads the cache, same numbers
    cached = list((tmp_path / "zeroshot" / lm.sha256[:16]).glob("fashion_mnist-*.npz"))
    assert len(cached) == 1
    assert zeroshot.evaluate(lm, test, cache_dir=str(tmp_path))["value"] == res["value"]


def test_cli_zeroshot_on_released_slip_checkpoint(tmp_path):
    """A checkpoint in the released SLIP layout ({epoch, args Namespace, DDP 'module.' state_dict})."""
    torch.manual_seed(0)
    model = build_model("CLIP_VIT_TINY")
    released = tmp_path / "released.pt"
    torch.save({"epoch": 24, "args": argparse.Namespace(model="CLIP_VIT_TINY", ssl_mlp_dim=4096, ssl_emb_dim=256),
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "best_acc1": 0.0}, released)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIP_EVAL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "zeroshot", "--checkpoint", str(released),
                          "--dataset", "digits", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                          "--max-samples", "100", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 1, out.stderr  # cifar10 is missing: reported, exit status 1
    assert "torchvision.datasets.CIFAR10" in out.stderr
    records = json.loads((tmp_path / "r.json").read_text())
    digits = records[0]
    assert digits["dataset"] == "digits" and digits["model"] == "CLIP_VIT_TINY" and digits["num_samples"] == 100
    assert 0.0 <= digits["value"] <= 100.0 and digits["metric"] == "top1"
    assert records[1]["value"] is None and "cifar10" in records[1]["reason"]
    assert np.isclose(digits["chance"], 10.0)
