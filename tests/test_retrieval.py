"""Retrieval recall@k: exact values on a constructed case; the real photo set end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation import common, retrieval
from tests._eval_util import tiny_checkpoint

torch.set_num_threads(1)  # 2 shared cores: busy-waiting intra-op threads slow everything down


def _unit(angle_deg: float) -> list[float]:
    a = np.deg2rad(angle_deg)
    return [np.cos(a), np.sin(a)]


def test_recall_at_k_exact_on_constructed_case():
    # 3 images on the unit circle at 0, 90, 180 degrees; 5 captions (image 0 has two).
    images = np.array([_unit(0), _unit(90), _unit(180)])
    texts = np.array([_unit(10),    # t0 of image 0
                      _unit(105),   # t1 of image 0: images by angle 1 (15), 2 (75), 0 (105) -> own at rank 3
                      _unit(70),    # t2 of image 1: image 1 (20) first
                      _unit(-30),   # t3 of image 2: images 0 (30), 1 (120), 2 (150) -> own at rank 3
                      _unit(175)])  # t4 of image 2: image 2 (5) first
    owner = np.array([0, 0, 1, 2, 2])
    r = retrieval.recall_at_k(images, texts, owner, ks=(1, 2, 3))
    assert r["text_to_image_R@1"] == pytest.approx(60.0)  # t0, t2, t4
    assert r["text_to_image_R@2"] == pytest.approx(60.0)
    assert r["text_to_image_R@3"] == pytest.approx(100.0)
    # image->text: image 0 -> t0 (10) first; image 1 -> t1 (15, not its own) then t2 (20); image 2 -> t4 (5)
    assert r["image_to_text_R@1"] == pytest.approx(200.0 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(100.0)
    assert r["mean_recall"] == pytest.approx(np.mean([v for k, v in r.items() if "R@" in k]))


def test_recall_is_scale_invariant_and_perfect_for_identical_embeddings():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(12, 8))
    r = retrieval.recall_at_k(e * 5.0, e, np.arange(12), ks=(1, 5, 10))
    assert all(v == 100.0 for v in r.values())


def test_photo_retrieval_with_trained_model(tmp_path):
    lm = common.load_model(tiny_checkpoint()["path"])
    res = retrieval.evaluate(lm, "photos")
    print(f"\nretrieval on 20 real photos (40 captions): {json.dumps({k: round(v, 1) for k, v in res.items() if 'R@' in k})}")
    assert res["num_samples"] == 20 and res["num_captions"] == 40
    assert set(res) >= {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(0.0 <= res[k] <= 100.0 for k in res if "R@" in k)
    # a jsonl captioned folder works the same way
    folder = tmp_path / "mini"
    folder.mkdir()
    from datasets.offline import photo_corpus

    photos = photo_corpus()[:3]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps({"image": p.path, "captions": [p.title]}) for p in photos))
    mini = retrieval.evaluate(lm, "mini", str(tmp_path))
    assert mini["num_samples"] == 3 and mini["image_to_text_R@5"] == 100.0  # k >= number of texts
