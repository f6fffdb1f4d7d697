"""The quality pass on a REAL download: YFCC-format metadata -> local HTTP server -> img2dataset CLI ->
ledger.final_ledger -> quality.run_quality. Planted: a resized/re-encoded copy and a byte-identical copy
of photos, a re-encoded Fashion-MNIST TEST image (eval overlap), a camera-file-name caption."""
from __future__ import annotations

import os

from PIL import Image

from datasets import config as dataset_config
from datasets import download, offline, pipeline, plan, quality, work
from datasets import ledger as ledger_mod
from datasets.quality import fingerprint
from datasets.httpserve import serve_directory
from tests._dataset_util import TEST_CONFIG, Row, write_metadata
from slip_core.config import to_dict
from tests._quality_util import assert_one_status, encode, short_side

QCFG = quality.QualityConfig(exact_dedup=True, near_dup_hamming=20, decontaminate=("fashion_mnist",),
                             drop_boilerplate_captions=True)


def _write(img_dir: str) -> list[tuple[str, str, str, str]]:
    """(relative path, title, description, expected decision) in row order."""
    os.makedirs(img_dir, exist_ok=True)
    photos = offline.photo_corpus()
    train, _ = offline.fashion_mnist("train")
    test, _ = offline.fashion_mnist("test")
    out = []

    def put(rel, data, title, desc, expect):
        with open(os.path.join(img_dir, rel), "wb") as f:
            f.write(data)
        out.append((rel, title, desc, expect))
    ims = [Image.open(p.path).convert("RGB") for p in photos[:5]]
    for i, (p, im) in enumerate(zip(photos[:5], ims)):
        put(f"p{i}.jpg", encode(im, 90), p.title, p.description, "success")
    for i in range(8):
        put(f"f{i}.png", encode(train[i], fmt="PNG"), "a photo of clothes", "", "success")
    put("copy_p0.jpg", encode(ims[0], 60, short_side(ims[0], 200)), "reposted", "", "duplicate_of:p0")
    put("same_p1.jpg", open(os.path.join(img_dir, "p1.jpg"), "rb").read(), "same file", "", "duplicate_of:p1")
    put("eval.jpg", encode(test[17], 85, (112, 112)), "a photo of a shirt", "", "eval_overlap:fashion_mnist")
    put("camera.jpg", encode(ims[3].rotate(90, expand=True), 90), "IMG_4031", "", "boilerplate_caption")
    return out


def test_quality_pass_on_a_real_img2dataset_download(tmp_path, monkeypatch):
    from datasets.quality import decontaminate

    monkeypatch.setattr(decontaminate, "_cache_path", lambda name, key: tmp_path / "evalfp" / f"{name}-{key}.parquet")
    monkeypatch.setenv("SLIP_EVAL_DATA", str(tmp_path / "eval"))  # catalog.prepare materialises Fashion-MNIST here
    img_dir = str(tmp_path / "images")
    files = _write(img_dir)
    cfg = dataset_config.make_config({**TEST_CONFIG, "name": "qtest"}, "tiny")
    with serve_directory(img_dir) as base:
        corpus = write_metadata(str(tmp_path / "yfcc100m_dataset"), str(tmp_path / "subset.tsv"),
                                [Row(f"{base}/{rel}", t, d) for rel, t, d, _ in files])
        store = str(tmp_path / "store")
        tm = pipeline.prepare_table(corpus.metadata, store, cfg, corpus.subset)
        wdir = work.work_dir(store, cfg)
        for group in plan.plan(pipeline.table_of(tm), wdir, cfg):
            download.run_group(group, cfg)
    ledger = ledger_mod.final_ledger(pipeline.table_of(tm), wdir)
    assert ledger["status"].to_pylist() == ["success"] * len(files)

    out, fps, report = quality.run_quality(ledger, QCFG)
    assert_one_status(ledger, out)
    key_of = {rel.split(".")[0]: k for (rel, *_), k in zip(files, sorted(corpus.keys))}
    got = {k: (r or s) for k, s, r in zip(out["key"].to_pylist(), out["status"].to_pylist(), out["reason"].to_pylist())}
    want = {}
    for (rel, _, _, expect), k in zip(files, sorted(corpus.keys)):
        want[k] = f"duplicate_of:{key_of[expect.split(':')[1]]}" if expect.startswith("duplicate_of") else expect
    assert got == want
    assert report["decontamination"]["datasets"]["fashion_mnist"]["examples"][0]["eval_id"] == "17"
    # img2dataset's own original-bytes sha256 is what exact dedup used for the byte-identical copy
    fp = {r["key"]: r for r in fps.to_pylist()}
    assert fp[key_of["same_p1"]]["orig_sha256"] == fp[key_of["p1"]]["orig_sha256"] != ""
    assert (fp[key_of["p0"]]["width"], fp[key_of["p0"]]["orig_width"]) == (64, Image.open(os.path.join(img_dir, "p0.jpg")).size[0])
    # fingerprints stored in the ledger, ready to be the next version's `previous`
    published = fingerprint.attach_to_ledger(out, fps)
    assert all(len(p) == 64 for p in published["phash"].to_pylist())

    # The dataset stage's hook (publish.publish with DatasetConfig.quality): same work folder (quality is
    # not part of the download identity, nothing is re-downloaded), filtered samples are not in the shards,
    # the ledger carries the decisions and the fingerprints, quality.json is part of the manifest.
    import json

    import pyarrow.parquet as pq
    import webdataset as wds

    from slip_core import artifacts

    qcfg = dataset_config.make_config({**TEST_CONFIG, "name": "qtest", "quality": to_dict(QCFG)}, "tiny")
    assert work.work_dir(store, qcfg) == wdir
    murl = pipeline.publish(tm, store, qcfg)
    root = artifacts.artifact_root(murl)
    m = artifacts.load_verified(murl)
    assert "quality.json" in {f.path for f in m.files} and m.config["quality"]["near_dup_hamming"] == 20
    led = pq.read_table(os.path.join(root, "ledger.parquet"))
    assert {k: (r or s) for k, s, r in zip(led["key"].to_pylist(), led["status"].to_pylist(), led["reason"].to_pylist())} == want
    assert led["phash"].to_pylist() == published["phash"].to_pylist()
    tars = sorted(os.path.join(root, p) for p in json.load(open(os.path.join(root, "sizes.json"))))
    in_shards = sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False))
    assert in_shards == sorted(k for k, v in want.items() if v == "success") and m.metrics["num_samples"] == len(in_shards)
    assert json.load(open(os.path.join(root, "quality.json")))["by_reason"] == report["by_reason"]
    # the next version keeps v1's decisions: previous_dataset = this manifest
    v2 = dataset_config.make_config({**TEST_CONFIG, "name": "qtest", "quality": {**to_dict(QCFG), "previous_dataset": murl}}, "tiny")
    assert work.work_dir(store, v2) == wdir
    led2 = pq.read_table(os.path.join(artifacts.artifact_root(pipeline.publish(tm, store, v2)), "ledger.parquet"))
    assert led2["reason"].to_pylist() == led["reason"].to_pylist()
