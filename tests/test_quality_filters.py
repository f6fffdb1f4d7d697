"""Caption / image / CLIP-score filters record their reasons in the ledger.

The CLIP-score test uses a RANDOMLY INITIALISED tiny CLIP saved as a checkpoint of ours (nothing is
trained or downloaded here): it checks the mechanics — scores are the cosine similarity of the model's
embeddings, the threshold removes exactly the samples below it, reasons are recorded — not that a random
model's scores mean anything.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from datasets import offline
from datasets.quality import filters as qf
from datasets.quality import fingerprint
from datasets.quality import QUALITY_PRESETS, QualityConfig, apply_quality_report, clip_scores_for_ledger, make_quality_config
from tests._quality_util import assert_one_status, encode, failed_rows, ledger, short_side, write_group

BOILERPLATE = ["IMG_1234", "IMG_1234.JPG", "DSC01234", "DSC_0001", "DSCN0001", "P1010123", "_MG_1234", "IMGP1234",
               "DSCF5678.jpg", "GOPR0042", "DJI_0001", "PXL_20210101_123456789", "IMG_20190101_123456", "100_1234",
               "IMG_1234 (2)", "img-2013", "20190704_153012", "my_holiday.jpeg", "untitled", "Untitled.", "photo",
               "  ", "12/07/2009", "---", "0001"]
REAL = ["Chelsea the cat", "a photo of a sneaker", "IMG of my dog at the beach", "DSC meeting 2019 in Berlin",
        "Paris", "P1 racing car", "Launch photo of DSCOVR on Falcon 9 by SpaceX", "photo of a bridge", "B52"]


def test_boilerplate_captions():
    assert [c for c in BOILERPLATE if not qf.is_boilerplate(c)] == []
    assert [c for c in REAL if qf.is_boilerplate(c)] == []


def test_caption_and_image_rules():
    assert qf.caption_reason("", drop_boilerplate=True) == "empty_caption"
    assert qf.caption_reason("IMG_0042", drop_boilerplate=True) == "boilerplate_caption"
    assert qf.caption_reason("IMG_0042") == ""  # every rule is opt-in
    assert qf.caption_reason("cat", min_words=2) == "caption_words<2"
    assert qf.caption_reason("a b c d", max_words=3) == "caption_words>3"
    assert qf.caption_reason("a cat", min_chars=6) == "caption_chars<6"
    assert qf.caption_reason("x" * 30, max_chars=20) == "caption_chars>20"
    assert qf.image_reason(300, 40, min_side=64) == "image_min_side<64"
    assert qf.image_reason(300, 100, max_aspect_ratio=2.5) == "aspect_ratio>2.5"
    assert qf.image_reason(300, 200, min_side=64, max_aspect_ratio=2.5) == ""
    assert qf.image_reason(None, None, min_side=64) == "undecodable_image"


def test_columnar_caption_rules_equal_the_per_caption_function():
    """caption_reasons (Arrow kernels on printable ASCII, the function itself on the rest) gives exactly
    caption_reason's reason for every caption, under every rule combination; and apply's alternative-caption
    reduction keeps a sample whose title or description passes."""
    import random
    import string

    import pyarrow as pa

    from datasets.quality.apply import caption_rule_reasons

    rng = random.Random(0)
    words = BOILERPLATE + REAL + ["", " ", "  IMG_1234  ", "untitled", " .Untitled! ", "12345", "-- --", "a b",
                                  "DSC_0001.JPG", "photo.jpeg", "IMG_1234 (2)", "img 12", "no title", "x" * 30]
    alphabet = string.printable + "é日\x1c\u2003\x00"
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 4))) if rng.random() < 0.6
            else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(6000)] + [None]
    arr = pa.array(caps, pa.string())
    for rules in [(0, 0, 0, 0, True), (2, 0, 0, 0, True), (0, 3, 5, 20, False), (2, 10, 3, 40, True), (0, 0, 0, 0, False)]:
        assert list(qf.caption_reasons(arr, *rules)) == [qf.caption_reason(c, *rules) for c in caps], rules
    alts = pa.chunked_array([pa.array([[], ["IMG_0001"], ["IMG_0002", "a real title"], None], pa.list_(pa.string()))])
    main = pa.chunked_array([pa.array(["IMG_0000"] * 4)])
    assert list(caption_rule_reasons(main, alts, (0, 0, 0, 0, True))) == ["boilerplate_caption", "boilerplate_caption", "",
                                                                     "boilerplate_caption"]


def test_configured_filters_record_reasons_in_ledger(tmp_path):
    photos = offline.photo_corpus()
    fm = offline.fashion_mnist("train")[0]
    ims = [Image.open(p.path).convert("RGB") for p in photos[:6]]
    samples = [
        {"key": "k0", "image": encode(ims[0], 90, short_side(ims[0], 128)), "caption": photos[0].title},
        {"key": "k1", "image": encode(ims[1], 90, short_side(ims[1], 128)), "caption": "IMG_4031.JPG"},
        {"key": "k2", "image": encode(ims[2], 90, short_side(ims[2], 128)), "caption": "cat"},
        {"key": "k3", "image": encode(ims[3], 90, short_side(ims[3], 128)), "caption": "word " * 60},
        {"key": "k4", "image": encode(fm[0], 90, (64, 64)), "caption": "a photo of a shoe", "orig_size": (28, 28)},
        {"key": "k5", "image": encode(ims[5], 90, (256, 40)), "caption": "a very wide panorama", "orig_size": (1024, 160)},
        {"key": "k6", "image": b"\xff\xd8\xff\xe0 truncated jpeg", "caption": "a broken file"},
        {"key": "k7", "image": encode(ims[4], 90, short_side(ims[4], 128)), "caption": ""},
        # YFCC rows: the loader picks title or description (SPEC 9.1), so one good candidate keeps the sample
        {"key": "y0", "image": encode(ims[4], 80, short_side(ims[4], 100)), "caption": "IMG_1234",
         "meta": {"title": "IMG_1234", "description": "my grandmother's coffee cup"}},
        {"key": "y1", "image": encode(ims[3], 80, short_side(ims[3], 100)), "caption": "DSC01234",
         "meta": {"title": "DSC01234", "description": "P1010123.JPG"}},
    ]
    led = ledger(write_group(str(tmp_path / "g"), samples) + failed_rows(["f0"]))
    fps = fingerprint.fingerprint_ledger(led)
    cfg = make_quality_config({"min_caption_words": 2, "max_caption_words": 50, "drop_boilerplate_captions": True,
                               "min_image_side": 32, "max_aspect_ratio": 3.0})
    out, report = apply_quality_report(led, fps, cfg)
    assert_one_status(led, out)
    got = {k: (r or s) for k, s, r in zip(out["key"].to_pylist(), out["status"].to_pylist(), out["reason"].to_pylist())}
    assert got == {"k0": "success", "k1": "boilerplate_caption", "k2": "caption_words<2", "k3": "caption_words>50",
                   "k4": "image_min_side<32", "k5": "aspect_ratio>3", "k6": "undecodable_image",
                   "k7": "empty_caption", "y0": "success", "y1": "boilerplate_caption", "f0": "HTTP Error 404"}
    assert report["success_in"] == 10 and report["success_out"] == 2 and report["by_reason"]["caption_words"] == 2
    # the "off" preset changes nothing but still drops undecodable images (a training loader would choke)
    off = apply_quality_report(led, fps, QUALITY_PRESETS["off"])[0]
    assert [r for r in off["reason"].to_pylist() if r] == ["undecodable_image", "HTTP Error 404"]
    with pytest.raises(ValueError, match="no fingerprint"):
        apply_quality_report(led, fps.slice(0, 3), cfg)


def test_clip_score_filter_with_a_checkpoint_of_ours(tmp_path):
    from slip_core.augment import decode_image, val_transform
    from slip_core.checkpoint import save_checkpoint
    from slip_core.registry import build_model
    from slip_core.tokenizer import tokenize

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ckpt = str(tmp_path / "clip_tiny.pt")
    save_checkpoint(ckpt, build_model("CLIP_VIT_TINY"))  # random init: tests mechanics only
    photos = offline.photo_corpus()[:12]
    samples = []
    for i, p in enumerate(photos):
        im = Image.open(p.path).convert("RGB")
        samples.append({"key": f"s{i:02d}", "image": encode(im, 90, short_side(im, 96)), "caption": p.title})
    led = ledger(write_group(str(tmp_path / "g"), samples))
    fps = fingerprint.fingerprint_ledger(led)
    scores = clip_scores_for_ledger(led, ckpt, batch_size=5)
    assert sorted(scores) == sorted(s["key"] for s in samples)
    assert all(-1.0 <= v <= 1.0 and not math.isnan(v) for v in scores.values())
    # one score recomputed by hand from the same checkpoint: cosine of encode_image / encode_text
    from slip_core.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt)
    with torch.inference_mode():
        x = val_transform(decode_image(samples[3]["image"]), model.config.image_size)[None]
        ie, te = model.encode_image(x), model.encode_text(tokenize([samples[3]["caption"]]))
        want = torch.nn.functional.cosine_similarity(ie, te).item()
    assert scores["s03"] == pytest.approx(want, abs=1e-5)
    assert clip_scores_for_ledger(led, ckpt, batch_size=64) == pytest.approx(scores, abs=1e-5)  # batching-invariant

    thr = sorted(scores.values())[len(scores) // 2]
    cfg = QualityConfig(clip_score_checkpoint=ckpt, min_clip_score=thr)
    with pytest.raises(ValueError, match="clip_scores_for_ledger"):
        apply_quality_report(led, fps, cfg)
    out, report = apply_quality_report(led, fps, cfg, scores=scores)
    assert_one_status(led, out)
    dropped = {k for k, r in zip(out["key"].to_pylist(), out["reason"].to_pylist()) if r}
    assert dropped == {k for k, v in scores.items() if v < thr} and len(dropped) == len(scores) // 2
    assert set(r for r in out["reason"].to_pylist() if r) == {f"clip_score<{thr:g}"}
    assert report["clip_score_mean"] == pytest.approx(sum(scores.values()) / len(scores), abs=1e-5)
