"""SLIP's own catalog files (templates.json, labels.json, dataset_catalog.json in the format they ship in SLIP's
repository, written here for the test) used verbatim through --reference-prompts / EvalConfig.reference_prompts;
every zero-shot record names its prompt source."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import catalog, prompts
from evaluation import common, metrics, zeroshot
from evaluation.tasks import EvalConfig, run_task
from tests._eval_util import random_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DIGIT_LABELS = [["zero", "nought"], "one", "two", "three", "four", "five", "six", "seven", "eight", ["nine", "9"]]


def write_reference(folder: Path, digits_path: Path | None = None) -> Path:
    """A folder in SLIP's layout: dataset -> templates / class names / {path, type, train, test}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "templates.json").write_text(json.dumps({
        "digits": ["a drawing of the digit {}.", "the handwritten number {}."],
        "mnist": ['a photo of the number: "{}".'],
        "birdsnap": ["a photo of a {}, a type of bird."],  # a set we do not catalogue: ignored
    }, indent=4))
    (folder / "labels.json").write_text(json.dumps({"digits": DIGIT_LABELS, "mnist": [str(i) for i in range(10)],
                                                    "birdsnap": ["Acadian Flycatcher"]}, indent=4))
    entries = {"mnist": {"path": "./data/mnist", "type": "special"}}  # SLIP's placeholder: not on disk here
    if digits_path is not None:
        entries["digits"] = {"path": str(digits_path), "type": "imagefolder", "train": "train", "test": "val"}
    (folder / "dataset_catalog.json").write_text(json.dumps(entries, indent=4))
    return folder


@pytest.fixture(scope="module")
def digits_elsewhere(tmp_path_factory) -> Path:
    """The digits test split in SLIP's imagefolder layout outside our data root, split folder named 'val'."""
    root = tmp_path_factory.mktemp("ours")
    catalog.prepare("digits", str(root))
    elsewhere = tmp_path_factory.mktemp("slip-data") / "digits"
    shutil.copytree(root / "digits" / "test", elsewhere / "val")
    return elsewhere


def test_reference_files_are_used_verbatim_and_their_paths_first(tmp_path, digits_elsewhere):
    ref = prompts.load_reference(str(write_reference(tmp_path / "ref", digits_elsewhere)))
    empty_root = str(tmp_path / "no-data-here")
    loaded = catalog.load("digits", "test", common.zeroshot_transform(32), empty_root, reference=ref)
    assert loaded.path == str(digits_elsewhere / "val") and loaded.format == "imagefolder"
    assert loaded.classnames == DIGIT_LABELS  # synonym lists kept as lists
    assert loaded.templates == ["a drawing of the digit {}.", "the handwritten number {}."]
    assert loaded.prompt_set.source == "slip-reference"
    # what the files do not cover keeps its usual source
    ours = str(tmp_path / "ours")
    catalog.prepare("fashion_mnist", ours)
    fm = catalog.load("fashion_mnist", "test", common.zeroshot_transform(32), ours, max_samples=5, reference=ref)
    assert fm.prompt_set.source == "ours" and fm.classnames[9] == "ankle boot"
    assert prompts.resolve("flowers").source == "clip-benchmark"
    assert prompts.resolve("imagenet").source == "open-clip"
    assert prompts.resolve("cub200", ["001.Black_footed_Albatross"] * 200).source == "dataset+ours"
    # a reference path that is not on disk is looked at, then our root, and both are named when missing
    with pytest.raises(catalog.DatasetMissing) as e:
        catalog.locate("mnist", "test", str(tmp_path / "none"), ref)
    assert "data/mnist/ (torchvision MNIST" in str(e.value) and str(tmp_path / "none" / "mnist") in str(e.value)


def test_zero_shot_scores_with_the_reference_prompts(tmp_path, digits_elsewhere):
    ref_dir = write_reference(tmp_path / "ref", digits_elsewhere)
    lm = common.load_model(random_checkpoint())
    cfg = EvalConfig(data_root=str(tmp_path / "no-data-here"), reference_prompts=str(ref_dir), device="cpu",
                     batch_size=64)
    rec = run_task("zeroshot", lm, "digits", cfg, cache_dir=str(tmp_path / "cache"), log=lambda s: None)
    assert (rec["prompt_source"], rec["classnames_source"], rec["templates_source"]) == ("slip-reference",) * 3
    assert rec["num_templates"] == 2 and rec["num_samples"] == 539  # the 30 % test split of 1,797
    # the same number from the files' prompts, computed by hand: every template x synonym, averaged per class
    loaded = catalog.load("digits", "test", common.zeroshot_transform(64), str(digits_elsewhere.parent / "x"),
                          reference=prompts.load_reference(str(ref_dir)))
    x, y = common.features(lm, loaded, "embed", cache_dir=str(tmp_path / "cache2"))
    w = zeroshot.text_classifier(lm.model, DIGIT_LABELS, ["a drawing of the digit {}.", "the handwritten number {}."])
    assert rec["value"] == pytest.approx(metrics.compute("top1", zeroshot.logits(x, w.numpy()), y)["value"])
    without = run_task("zeroshot", lm, "digits", EvalConfig(data_root=str(digits_elsewhere.parent / "ours"), device="cpu"),
                       cache_dir=str(tmp_path / "cache"), log=lambda s: None)
    assert without["prompt_source"] == "ours" and without["num_templates"] == 1


@pytest.mark.parametrize("broken,message", [
    ({"labels.json": None}, "missing labels.json"),
    ({"templates.json": {"digits": ["no placeholder"]}}, "each with a {}"),
    ({"labels.json": {"digits": [1, 2]}}, "list of class names"),
    ({"dataset_catalog.json": {"digits": {"path": "/x", "type": "zip"}}}, "'type' in"),
    ({"templates.json": "[1, 2"}, "not readable JSON"),
])
def test_malformed_reference_folders_are_refused_in_one_line(tmp_path, broken, message):
    ref = write_reference(tmp_path / "ref")
    for name, content in broken.items():
        if content is None:
            (ref / name).unlink()
        else:
            (ref / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(prompts.ReferencePromptsError, match=message.replace("{", r"\{").replace("}", r"\}")):
        prompts.load_reference(str(ref))


def test_cli_reference_prompts(tmp_path, digits_elsewhere):
    ref = write_reference(tmp_path / "ref", digits_elsewhere)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIP_EVAL_CACHE": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "flows.cli", "eval", "zeroshot", "--checkpoint", random_checkpoint(),
            "--data-root", str(tmp_path / "data"), "--max-samples", "60", "--device", "cpu"]
    out = subprocess.run(base + ["--dataset", "digits", "--dataset", "mnist", "--reference-prompts", str(ref),
                                 "--out", str(tmp_path / "r.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    digits, mnist = json.loads((tmp_path / "r.json").read_text())
    assert digits["prompt_source"] == mnist["prompt_source"] == "slip-reference"
    assert mnist["data_format"] == "torchvision"  # not at SLIP's placeholder path: found (prepared) in our root
    (ref / "labels.json").unlink()
    bad = subprocess.run(base + ["--dataset", "digits", "--reference-prompts", str(ref)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing labels.json" in bad.stderr and "Traceback" not in bad.stderr
    assert np.isfinite(digits["value"])
