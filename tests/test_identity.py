"""Stage identity, the Store and the config resolver, without Prefect: normalised module hashes, import
closures of the real stage entry modules, explanations, the store layout, `--set` resolution."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from slip_core import artifacts, identity, storage
from slip_core.config import ConfigError, resolve
from slip_core.store import Store

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("slip_core", "datasets", "evaluation", "flows")


def _module(root: Path, source: str) -> str:
    (root / "slip_core").mkdir(parents=True)
    (root / "slip_core" / "__init__.py").write_text("")
    (root / "slip_core" / "m.py").write_text(source)
    return identity.module_info("slip_core.m", root).sha256


BASE = '''"""Module docstring."""
import argparse


def f(x):
    """Function docstring."""
    return x + 1  # a comment


def cli():
    p = argparse.ArgumentParser(description="a tool")
    p.add_argument("--n", type=int, default=1, help="how many")
    return p
'''


def test_docstrings_comments_blank_lines_and_help_text_do_not_count(tmp_path):
    base = _module(tmp_path / "a", BASE)
    same = BASE.replace("Module docstring.", "Reworded.").replace("# a comment", "# another comment\n\n") \
        .replace('help="how many"', 'help="how many times, reworded"').replace('description="a tool"', 'description="x"')
    assert _module(tmp_path / "b", same) == base
    assert _module(tmp_path / "c", BASE.replace("x + 1", "x + 2")) != base
    assert _module(tmp_path / "d", BASE.replace("default=1", "default=2")) != base


def _closure(entries, root=None, stop=()):
    return set(identity.closure(entries, root, stop)[0])


def test_real_stage_closures_separate_the_stages():
    from datasets import pipeline, publish
    from flows import evaluate, pretrain

    table = _closure(pipeline.TABLE_CODE)
    dataset = _closure(publish.DATASET_CODE, stop=publish.MODEL_CODE)
    train = _closure(pretrain.TRAIN_CODE, stop=pretrain.TRAIN_MONITORS)
    evaluation = _closure(evaluate.EVAL_CODE)
    assert {"datasets.sources.yfcc", "datasets.sources.captions"} <= table and "datasets.download" not in table
    # download code and the img2dataset wrapper it runs as `python -m`, but no trainer / model / loss code
    assert {"datasets.download", "datasets.plan", "datasets.publish", "datasets.img2dataset_bounded"} <= dataset
    assert not {"slip_core.trainer", "slip_core.models", "slip_core.losses", "slip_core.optim"} & dataset
    assert {"slip_core.trainer", "slip_core.models", "slip_core.losses", "slip_core.launch"} <= train
    zeroshot = evaluate.run_task.__module__.rsplit(".", 1)[0] + ".zeroshot"
    probe = evaluate.run_task.__module__.rsplit(".", 1)[0] + ".linear_probe"
    assert zeroshot in evaluation and zeroshot not in dataset
    # training evaluates zero-shot as it goes (evaluation.train_entry -> in_training), but only as a monitor:
    # the entry is train code, the evaluation it runs is not (an eval fix reruns only eval)
    assert "evaluation.train_entry" in train and not {zeroshot, "evaluation.in_training"} & train
    assert probe in evaluation and probe not in train | dataset
    assert not any(m.startswith("flows") for m in table | dataset | train | evaluation)
    assert "slip_core.identity" not in dataset | train | evaluation  # infrastructure, not stage code
    # the CLIP-score filter loads a model: with it on, model code is part of the dataset's identity
    assert "slip_core.models" in _closure(publish.DATASET_CODE)


def test_identity_of_an_edited_copy_changes_only_where_the_module_is_used(tmp_path):
    from datasets import publish
    from flows import evaluate, pretrain

    for copy in ("same", "edited"):
        for pkg in PACKAGES:
            if (REPO / pkg).is_dir():
                shutil.copytree(REPO / pkg, tmp_path / copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    stages = {"dataset": (publish.DATASET_CODE, publish.MODEL_CODE), "train": (pretrain.TRAIN_CODE, pretrain.TRAIN_MONITORS),
              "eval": (evaluate.EVAL_CODE, ())}

    def shas(root):
        return {s: identity.code(c, root, stop).sha256 for s, (c, stop) in stages.items()}

    before = shas(tmp_path / "same")
    assert before == shas(REPO)  # where the tree lives does not matter
    probe = Path(*evaluate.run_task.__module__.split(".")[:-1], "linear_probe.py")  # eval-only code
    with open(tmp_path / "edited" / probe, "a") as f:
        f.write("\nEDITED = 1\n")
    after = shas(tmp_path / "edited")  # identities are memoised per (process, tree): a second tree
    assert after["eval"] != before["eval"] and after["train"] == before["train"] and after["dataset"] == before["dataset"]


def test_differences_say_what_changed():
    code = identity.Code({"a.x": "1", "a.y": "2"}, {"python": "3.11", "timm": "1.0"})
    old = identity.StageIdentity("eval", "m", {"checkpoint": "c" * 64}, {"max_samples": 300, "fast": {"C": 1.0}}, code)
    new = identity.StageIdentity("eval", "m", {"checkpoint": "d" * 64}, {"max_samples": 200, "fast": {"C": 1.0}},
                                 identity.Code({"a.x": "9", "a.z": "3"}, {"python": "3.11", "timm": "2.0"}))
    reasons = identity.differences(old.to_dict(), new.to_dict())
    assert reasons[0].startswith("input changed: checkpoint (cccccccccccc… -> dddddddddddd…)")
    assert "config changed: max_samples (300 -> 200)" in reasons
    assert "library changed: timm (1.0 -> 2.0)" in reasons
    assert "code changed: a.x; added a.z; removed a.y" in reasons
    assert identity.differences(old.to_dict(), old.to_dict()) == [] and old.sha256 != new.sha256


def _publish(store: Store, ident: identity.StageIdentity, payload: str) -> str:
    root = store.stage_root(ident)
    storage.atomic_write_text(storage.join(root, "x.txt"), payload)
    return artifacts.publish(artifacts.build_manifest(root, ["x.txt"], kind=ident.kind, name=ident.name,
                                                      identity=ident.to_dict()), root)


def test_store_finds_explains_and_lays_out(tmp_path):
    st = Store(str(tmp_path / "store"))
    code = identity.Code({"m": "1"}, {"python": "3.11"})
    a = identity.StageIdentity("eval", "model", {"checkpoint": "c1"}, {"n": 1}, code)
    b = identity.StageIdentity("eval", "model", {"checkpoint": "c1"}, {"n": 2}, code)
    url = _publish(st, a, "a")
    assert url == storage.join(tmp_path / "store", "eval", f"model-{a.sha256[:16]}", "manifest.json")
    assert st.status(a).state == "cached" and st.status(a).artifact == url
    assert st.status(b).state == "run" and st.status(b).reasons[0] == "config changed: n (1 -> 2)"
    assert st.status(a, forced=True).reasons == ["forced by --rebuild"]
    storage.atomic_write_text(storage.join(artifacts.artifact_root(url), "x.txt"), "tampered")
    damaged = st.status(a)
    assert damaged.state == "run" and "does not verify" in damaged.reasons[0]
    assert damaged.expected_sha256 == artifacts.load_manifest(url).sha256  # rebuilt in place: same manifest expected
    assert st.latest("eval") is None  # the only one no longer verifies
    url_b = _publish(st, b, "b")
    assert st.latest("eval", "model") == url_b and [u for u, _ in st.find(b)] == [url_b]
    assert st.work_dir("dataset", "demo-1") == storage.join(st.root, "dataset-work", "demo-1")
    assert st.run_dir(artifacts.artifact_root(url)) == os.path.join(artifacts.artifact_root(url), "run")
    assert st.local_dir("raw") == str(tmp_path / "store" / "raw")
    assert Store("s3://bucket/store").run_dir("s3://bucket/store/checkpoint/m-1") == \
        os.path.join(storage.CACHE_HOME, "runs", "m-1")
    src = tmp_path / "meta.tsv"
    src.write_text("one")
    first = st.content_sha256(str(src))
    assert first == storage.sha256_bytes(b"one") and len(os.listdir(st.hash_cache())) == 1
    src.write_text("two!")
    assert st.content_sha256(str(src)) == storage.sha256_bytes(b"two!")


def test_one_resolver_for_presets_and_overrides():
    from datasets.config import DATASET_PRESETS
    from datasets.quality.config import QUALITY_PRESETS

    cfg = resolve(DATASET_PRESETS, "tiny", {"image_size": 32, "quality.exact_dedup": True}, what="dataset")
    assert cfg.image_size == 32 and cfg.quality.exact_dedup and cfg.name == "demo"
    named = resolve(DATASET_PRESETS, "tiny", {"quality": "default"}, what="dataset", named={"quality": QUALITY_PRESETS})
    assert named.quality == QUALITY_PRESETS["default"]
    assert resolve(DATASET_PRESETS, "tiny") is DATASET_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="unknown dataset preset 'nope'"):
        resolve(DATASET_PRESETS, "nope", what="dataset")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['imagesize'\]"):
        resolve(DATASET_PRESETS, "tiny", {"imagesize": 3})
    with pytest.raises(ConfigError, match="unknown field 'dedup'"):
        resolve(DATASET_PRESETS, "tiny", {"quality.dedup": True})


def test_manifest_sha_ignores_the_whole_repo_code_version(tmp_path):
    root = str(tmp_path / "a")
    storage.atomic_write_text(storage.join(root, "x.txt"), "x")
    m = artifacts.build_manifest(root, ["x.txt"], kind="eval", name="n", identity={"sha256": "i"})
    other = artifacts.Manifest.from_json(m.to_json())
    other.code_version, other.created_at = "something-else", "2000-01-01T00:00:00+00:00"
    assert other.sha256 == m.sha256
    other.identity = {"sha256": "j"}
    assert other.sha256 != m.sha256
    assert json.loads(m.to_json())["identity"] == {"sha256": "i"}
