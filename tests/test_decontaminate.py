"""Decontamination on real images: eval-set images planted (re-encoded) in training shards are removed with
`eval_overlap:<dataset>`, and distinct training images are not."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets import offline
from datasets.quality import decontaminate, fingerprint
from datasets.quality import QualityConfig, apply_quality_report
from tests._quality_util import assert_one_status, encode, failed_rows, ledger, write_group


@pytest.fixture(autouse=True, scope="module")
def evalfp_cache(tmp_path_factory):
    """The eval catalog's data root and the eval fingerprint cache in temporary folders shared by this
    module's tests (not in .data/): the local eval sets are materialised there by catalog.prepare."""
    d = tmp_path_factory.mktemp("evalfp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIP_EVAL_DATA", str(d / "eval"))
        mp.setattr(decontaminate, "_cache_path", lambda name, key: d / f"{name}-{key}.parquet")
        yield d


def _decisions(led):
    return {k: (r if s == "filtered" else s) for k, s, r in
            zip(led["key"].to_pylist(), led["status"].to_pylist(), led["reason"].to_pylist())}


def test_planted_eval_images_are_removed_with_their_dataset(tmp_path, evalfp_cache):
    train, _ = offline.fashion_mnist("train")
    test, _ = offline.fashion_mnist("test")
    from datasets import catalog

    digit_file = sorted((catalog.prepare("digits") / "test").rglob("*.png"))[100]  # a digit of its TEST split
    digit_id = str(digit_file.relative_to(catalog.data_root() / "digits" / "test"))
    n_digits_test = len(list((catalog.data_root() / "digits" / "test").rglob("*.png")))
    rng = np.random.default_rng(7)
    samples = [{"key": f"t{j:04d}", "image": encode(train[i], 90, (64, 64)), "caption": "a photo of clothes"}
               for j, i in enumerate(rng.choice(len(train), 200, replace=False))]
    planted = {f"e_fm_{i}": ("fashion_mnist", str(i)) for i in (0, 17, 4242, 9999)}
    for k, (_, i) in planted.items():  # the tiny demo's re-encoding: 64 px, JPEG q90
        samples.append({"key": k, "image": encode(test[int(i)], 90, (64, 64)), "caption": "a photo of clothes"})
    samples.append({"key": "e_fm_low_q", "image": encode(test[123], 55, (96, 96)), "caption": "blurry"})
    planted["e_fm_low_q"] = ("fashion_mnist", "123")
    samples.append({"key": "e_digit", "image": encode(Image.open(digit_file), 85, (64, 64)), "caption": "a digit"})
    planted["e_digit"] = ("digits", digit_id)
    led = ledger(write_group(str(tmp_path / "g0"), samples) + failed_rows(["f1"]))
    fps = fingerprint.fingerprint_ledger(led)

    cfg = QualityConfig(decontaminate=("fashion_mnist", "digits"))
    out, report = apply_quality_report(led, fps, cfg)
    assert_one_status(led, out)
    got = _decisions(out)
    flagged = {k: v for k, v in got.items() if v.startswith("eval_overlap:")}
    assert flagged == {k: f"eval_overlap:{ds}" for k, (ds, _) in planted.items()}
    rep = report["decontamination"]["datasets"]
    assert rep["fashion_mnist"]["eval_images"] == 10000 and rep["digits"]["eval_images"] == n_digits_test
    assert rep["fashion_mnist"]["overlapping_samples"] == 5 and rep["digits"]["overlapping_samples"] == 1
    ids = {e["key"]: e["eval_id"] for d in rep.values() for e in d["examples"]}
    assert ids == {k: i for k, (_, i) in planted.items()}  # the report names the exact eval image
    assert report["by_reason"] == {"eval_overlap:digits": 1, "eval_overlap:fashion_mnist": 5}
    # second build reads the content-keyed fingerprint cache
    assert list(evalfp_cache.glob("fashion_mnist-*.parquet"))
    again = apply_quality_report(led, fps, cfg)[0]
    assert _decisions(again) == got


def test_false_positive_rate_train_vs_eval():
    """2,000 Fashion-MNIST TRAIN images (64 px JPEG copies, as the demo corpus ships them) against the
    10,000 TEST images: how many would be wrongly removed."""
    train, _ = offline.fashion_mnist("train")
    idx = np.sort(np.random.default_rng(0).choice(len(train), 2000, replace=False))
    fps = fingerprint.to_table([{**fingerprint.fingerprint_bytes(encode(train[i], 90, (64, 64))), "key": str(i),
                                 "orig_sha256": "", "orig_width": 28, "orig_height": 28, "caption": ""} for i in idx])
    index = decontaminate.load_eval_index(["fashion_mnist"], hamming=20)
    overlaps = decontaminate.find_overlaps(fps, index)
    test, _ = offline.fashion_mnist("test")
    diffs = {k: float(np.abs(train[int(k)].astype(int) - test[int(i)]).mean()) for k, (_, i, _) in overlaps.items()}
    print(f"\nfashion_mnist train->test overlaps: {len(overlaps)}/2000 train images flagged "
          f"({len(overlaps) / 2000:.2%}); mean |pixel diff| of each flagged pair: {diffs}")
    # Fashion-MNIST has a few genuine near-duplicates across its splits; anything flagged must be one
    # (mean absolute pixel difference well below that of distinct images, ~60/255).
    assert len(overlaps) <= 2 and all(d < 15 for d in diffs.values())


def test_wildcard_skips_unavailable_sets_but_named_ones_must_exist(monkeypatch):
    from datasets import catalog

    monkeypatch.setattr(catalog, "CATALOG", {n: catalog.CATALOG[n] for n in ("digits", "cifar10", "imagenet")})
    index = decontaminate.load_eval_index(("*",))
    assert index.checked == {"digits": 539} and set(index.unavailable) == {"cifar10", "imagenet"}
    assert "not found" in index.unavailable["imagenet"]
    report = decontaminate.overlap_report({}, index)
    assert report["datasets"]["digits"]["overlapping_samples"] == 0 and set(report["unavailable"]) == {"cifar10", "imagenet"}
    with pytest.raises(decontaminate.EvalUnavailable):
        decontaminate.load_eval_index(("cifar10",))
    with pytest.raises(decontaminate.EvalUnavailable):
        decontaminate.load_eval_index(("no_such_dataset",))


def test_image_folder_eval_set(tmp_path):
    """An ImageFolder-style eval set is fingerprinted from its files (test split only)."""
    images, labels = offline.fashion_mnist("test")
    for i in range(60):
        d = tmp_path / "fm" / "test" / offline.FASHION_CLASSES[labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:05d}.png")
    train = offline.fashion_mnist("train")[0]
    (tmp_path / "fm" / "train" / "bag").mkdir(parents=True)
    Image.fromarray(train[0]).save(tmp_path / "fm" / "train" / "bag" / "00000.png")  # not an eval split
    table = decontaminate.fingerprint_folder("fashion_mnist", tmp_path / "fm")
    assert len(table) == 60
    index = decontaminate.EvalIndex(table, 20, {"fashion_mnist": 60}, {})
    hit = index.match(fingerprint.fingerprint_bytes(encode(images[7], 90, (64, 64)))["phash"])
    assert hit is not None and hit[1:] == ("fashion_mnist", f"test/{offline.FASHION_CLASSES[labels[7]]}/00007.png")
    assert index.match(fingerprint.fingerprint_bytes(encode(train[0], 90))["phash"]) is None
