"""Retrieval recall@k: exact values on a constructed case, CLIP_benchmark's definition; the real photo set end to
end; COCO / Flickr30k in Karpathy's JSON + image folder and in CLIP_benchmark's webdataset, built from the photos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import common, retrieval
from tests._eval_util import random_checkpoint, tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent

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


# ---------------------------------------------------------------- COCO / Flickr30k in their on-disk forms
def _photo_split():
    """14 of the 20 offline photos as a 'test' split (2-3 captions each), the rest train / restval."""
    from datasets.offline import photo_corpus

    photos = photo_corpus()
    splits = ["test"] * 14 + ["train"] * 4 + ["restval"] * 2
    caps = [[p.title, p.description] + ([f"{p.title}, {p.description}"] if i % 3 == 0 else [])
            for i, p in enumerate(photos)]
    return photos, splits, caps


def write_karpathy(root: Path, name: str) -> Path:
    """Karpathy's dataset_<name>.json + images where COCO (val2014/<file>) / Flickr30k (flickr30k-images/) put them."""
    import shutil

    photos, splits, caps = _photo_split()
    base = root / name
    rows = []
    for i, (p, split, c) in enumerate(zip(photos, splits, caps)):
        sub = "val2014" if name == "coco" else "flickr30k-images"
        fname = (f"COCO_val2014_{i:012d}" if name == "coco" else f"{1000 + i}") + Path(p.path).suffix
        (base / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(p.path, base / sub / fname)
        row = {"filename": fname, "split": split, "imgid": i, "sentids": list(range(3 * i, 3 * i + len(c))),
               "sentences": [{"raw": t, "tokens": t.lower().split(), "imgid": i} for t in c]}
        if name == "coco":
            row.update(filepath="val2014", cocoid=i)
        rows.append(row)
    (base / f"dataset_{name}.json").write_text(json.dumps({"images": rows, "dataset": name}))
    return base


def write_clip_benchmark_wds(root: Path, name: str, shards: int = 2) -> Path:
    """CLIP_benchmark's retrieval webdataset of the same test images: <key>.<jpg|png> + <key>.txt."""
    import webdataset as wds

    photos, splits, caps = _photo_split()
    test = [(p, c) for p, s, c in zip(photos, splits, caps) if s == "test"]
    base = root / name
    (base / "test").mkdir(parents=True)
    per = -(-len(test) // shards)
    for s in range(shards):
        with wds.TarWriter(str(base / "test" / f"{s}.tar")) as sink:
            for i, (p, c) in enumerate(test[s * per:(s + 1) * per], start=s * per):
                ext = Path(p.path).suffix[1:].replace("jpeg", "jpg")
                sink.write({"__key__": f"s{i:06d}", ext: Path(p.path).read_bytes(), "txt": "\n".join(c).encode()})
    (base / "test" / "nshards.txt").write_text(f"{shards}\n")
    (base / "dataset_type.txt").write_text("retrieval\n")
    return base


def test_coco_and_flickr_forms_give_the_same_recall(tmp_path):
    from datasets import retrieval_sets

    lm = common.load_model(random_checkpoint())
    write_karpathy(tmp_path / "k", "coco")
    write_karpathy(tmp_path / "k", "flickr30k")
    write_clip_benchmark_wds(tmp_path / "w", "coco")
    write_clip_benchmark_wds(tmp_path / "w", "flickr30k", shards=3)
    results = {}
    for form, root in (("karpathy", tmp_path / "k"), ("wds", tmp_path / "w")):
        for name in ("coco", "flickr30k"):
            split = retrieval_sets.load(name, str(root))
            assert split.format == form and len(split) == 14
            assert sum(len(c) for c in split.captions) == 14 * 2 + 5  # 5 of the 14 carry a third caption
            results[(form, name)] = retrieval.evaluate(lm, name, str(root), batch_size=4)
    first = results[("karpathy", "coco")]
    for key, res in results.items():
        assert {k: v for k, v in res.items() if k != "data_format"} == \
            {k: v for k, v in first.items() if k != "data_format"}, key
    assert first["num_samples"] == 14 and first["num_captions"] == 33


def test_recall_is_clip_benchmarks_definition(tmp_path):
    cb = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from datasets import retrieval_sets

    lm = common.load_model(random_checkpoint())
    write_karpathy(tmp_path, "flickr30k")
    img, txt, owner = retrieval.embed(lm, retrieval_sets.load("flickr30k", str(tmp_path)))
    ours = retrieval.recall_at_k(img, txt, owner)
    scores = torch.from_numpy(txt @ img.T)  # [texts, images], as CLIP_benchmark builds it
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), torch.from_numpy(owner)] = True
    for k in (1, 5, 10):
        t2i = (cb.batchify(cb.recall_at_k, scores, positive, 8, "cpu", k=k) > 0).float().mean().item()
        i2t = (cb.batchify(cb.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(100 * t2i)  # CLIP_benchmark's image_retrieval_recall
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(100 * i2t)  # CLIP_benchmark's text_retrieval_recall


def test_missing_or_broken_retrieval_sets_say_what_and_where(tmp_path):
    from datasets import catalog, retrieval_sets

    with pytest.raises(catalog.DatasetMissing) as e:
        retrieval_sets.load("coco", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "coco" / "dataset_coco.json") in msg and "nshards.txt" in msg and "cocodataset.org" in msg
    base = write_karpathy(tmp_path, "flickr30k")
    victim = sorted((base / "flickr30k-images").iterdir())[0]
    victim.unlink()
    with pytest.raises(catalog.DatasetMissing, match=victim.name):
        retrieval_sets.load("flickr30k", str(tmp_path))
    wds_base = write_clip_benchmark_wds(tmp_path / "w", "coco")
    import webdataset as wds

    with wds.TarWriter(str(wds_base / "test" / "1.tar")) as sink:  # a sample without captions
        sink.write({"__key__": "x", "png": b"no caption next to me"})
    with pytest.raises(ValueError, match="lacks a .txt label"):
        retrieval_sets.load("coco", str(tmp_path / "w"))


def test_retrieval_task_record_and_catalog_listing(tmp_path):
    from evaluation.clip_benchmark_results import to_clip_benchmark
    from evaluation.tasks import EvalConfig, run_task

    write_karpathy(tmp_path, "coco")
    lm = common.load_model(random_checkpoint())
    rec = run_task("retrieval", lm, "coco", EvalConfig(data_root=str(tmp_path), device="cpu"), log=lambda s: None)
    assert rec["data_format"] == "karpathy" and rec["num_samples"] == 14 and rec["device"] == "cpu"
    assert to_clip_benchmark(rec, "demo")["dataset"] == "mscoco_captions"
    out = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "list", "--data-root", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.strip()}
    assert "found (karpathy)" in lines["coco"] and "missing" in lines["flickr30k"] and "retrieval" in lines["coco"]
