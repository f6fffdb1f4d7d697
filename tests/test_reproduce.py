"""The reproduce flow end to end on a small demo corpus, through the real Prefect engine:
raw YFCC-format URLs -> img2dataset shards -> tiny SLIP pretraining -> eval -> report; then the cache,
eval-only reruns, tamper detection, --rebuild and lineage."""
import json
import os
import subprocess
import sys

import pytest

from slip_core import artifacts, storage
from tests._stage_runs import TINY_CORPUS as CORPUS
from tests._stage_runs import TINY_EVAL as EVAL
from tests._stage_runs import TINY_TRAIN as TRAIN
from tests._stage_runs import tiny_pipeline

pytestmark = pytest.mark.prefect


def _mtime(url):
    return os.path.getmtime(artifacts.local_path(url))


@pytest.fixture(scope="module")
def first_run(prefect_server):
    return tiny_pipeline(prefect_server)  # shared with test_stage_identity.py


def _again(store, **kw):
    from flows.reproduce import reproduce

    args = dict(preset="tiny", store=store, train_config=TRAIN, eval_config=EVAL, demo_corpus=CORPUS)
    args.update(kw)
    return reproduce(**args)


def test_pipeline_produces_verified_artifacts_and_report(first_run):
    store, r = first_run
    for stage in ("dataset", "checkpoint", "eval"):
        assert artifacts.verify(r[stage]) == [], stage
    ds = artifacts.load_manifest(r["dataset"])
    assert ds.kind == "dataset" and ds.metrics["num_samples"] > 200
    results = json.loads(storage.read_text(storage.join(artifacts.artifact_root(r["eval"]), "results.json")))
    assert {(x["task"], x["dataset"]) for x in results} == {("zeroshot", "fashion_mnist"), ("linear", "fashion_mnist")}
    html = open(artifacts.local_path(r["report"])).read()
    assert "loss curve" in html and "fashion_mnist" in html and "Lineage" in html
    # issue 20: the in-training zero-shot curve and its best step; the demo evaluates the final checkpoint
    ck = artifacts.load_manifest(r["checkpoint"])
    assert "Evaluation during training" in html
    assert f"best step {ck.metrics['best_step']}, zero-shot {ck.metrics['best_value']:.1f}%" in html
    assert artifacts.load_manifest(r["eval"]).config["checkpoint_file"] == "checkpoint.pt"


def test_which_best_evaluates_the_best_checkpoint_and_reruns_only_eval(first_run):
    store, r = first_run
    before = _mtime(artifacts.manifest_url(r["checkpoint"]))
    r2 = _again(store, eval_config={**EVAL, "linear": [], "which": "best"})
    m = artifacts.load_manifest(r2["eval"])
    assert r2["checkpoint"] == r["checkpoint"] and _mtime(artifacts.manifest_url(r2["checkpoint"])) == before
    assert m.config["which"] == "best" and m.config["checkpoint_file"] == "checkpoint_best.pt"
    best = storage.join(artifacts.artifact_root(r["checkpoint"]), "checkpoint_best.pt")
    assert m.config["checkpoint_sha256"] == storage.sha256_file(best)


def test_clip_baseline_is_trained_on_the_same_dataset_at_equal_steps_and_reported_beside_slip(first_run):
    store, r = first_run
    clip = r["baselines"]["clip"]
    assert artifacts.verify(clip["checkpoint"]) == [] and artifacts.verify(clip["eval"]) == []
    slip_ck, clip_ck = artifacts.load_manifest(r["checkpoint"]), artifacts.load_manifest(clip["checkpoint"])
    assert (slip_ck.name, clip_ck.name) == ("slip_vit_tiny", "clip_vit_tiny")
    assert slip_ck.upstream["dataset"].sha256 == clip_ck.upstream["dataset"].sha256  # one dataset artifact
    assert slip_ck.metrics["steps"] == clip_ck.metrics["steps"] == TRAIN["max_steps"]  # equal steps
    html = open(artifacts.local_path(r["report"])).read()
    section = html[html.index("CLIP vs SLIP (paper Table 2 layout)"):html.index("<h2>Dataset")]
    ours = section[section.index("<h3>Ours"):section.index("<h3>Paper")]
    assert "<td>SLIP</td>" in ours and "<td>CLIP</td>" in ours and "zeroshot/fashion_mnist" in ours
    assert "linear/fashion_mnist" in ours and "samples/s" in ours and "train wall time (s)" in ours
    assert "<td>42.8</td>" in section and "<td>37.6</td>" in section  # the paper's ViT-B/16 numbers beside
    assert "Ordering: SLIP above CLIP on" in section


def test_lineage_reaches_the_raw_url_table(first_run):
    _, r = first_run
    text = artifacts.format_lineage(r["eval"])
    kinds = [m.kind for _, _, m, _ in artifacts.lineage(r["eval"]) if m is not None]
    assert kinds[:3] == ["eval", "checkpoint", "dataset"] and "caption-table" in kinds, text
    exe = os.path.join(os.path.dirname(sys.executable), "slip")
    out = subprocess.run([exe, "lineage", r["report"].rsplit("/", 1)[0]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "caption-table" in out.stdout, out.stderr
    assert "raw input:" in out.stdout and "demo-corpus" in out.stdout  # back to the raw URL table


def test_unchanged_rerun_is_all_cache_hits(first_run):
    store, r = first_run
    before = {k: _mtime(artifacts.manifest_url(r[k])) for k in ("dataset", "checkpoint", "eval")}
    r2 = _again(store)
    assert {k: r2[k] for k in before} == {k: r[k] for k in before} and r2["baselines"] == r["baselines"]
    assert {k: _mtime(artifacts.manifest_url(r2[k])) for k in before} == before  # nothing republished


def test_changing_an_eval_setting_reruns_only_eval(first_run):
    store, r = first_run
    before = {k: _mtime(artifacts.manifest_url(r[k])) for k in ("dataset", "checkpoint")}
    r2 = _again(store, eval_config={**EVAL, "max_samples": 200})
    assert r2["eval"] != r["eval"] and artifacts.verify(r2["eval"]) == []
    assert {k: _mtime(artifacts.manifest_url(r2[k])) for k in before} == before


def test_tampered_artifact_is_rebuilt_and_reported(first_run, fault_log):
    from prefect.artifacts import Artifact

    store, r = first_run
    shard = [f.path for f in artifacts.load_manifest(r["dataset"]).files if f.path.startswith("shards/")][-1]
    path = artifacts.local_path(storage.join(artifacts.artifact_root(r["dataset"]), shard))
    with open(path, "r+b") as f:
        f.seek(600)
        f.write(b"\x00tampered\x00")
    assert artifacts.verify(r["dataset"])
    r2 = _again(store)
    assert artifacts.verify(r2["dataset"]) == []
    assert r2["checkpoint"] == r["checkpoint"]  # rebuilt shards are byte-identical: training stays cached
    assert Artifact.get("rebuilt-dataset") is not None
    fault_log.record("artifact", "reproduce", "published dataset shard overwritten in place (10 bytes) before a rerun",
                     "manifest check found the sha256 mismatch; the dataset stage was rebuilt byte-identically, so "
                     "pretraining stayed a cache hit; a 'rebuilt-dataset' Prefect artifact reports it")


def test_rebuild_eval_forces_only_eval(first_run):
    store, r = first_run
    r1 = _again(store)
    before = {k: _mtime(artifacts.manifest_url(r1[k])) for k in ("dataset", "checkpoint", "eval")}
    r2 = _again(store, rebuild="eval")
    after = {k: _mtime(artifacts.manifest_url(r2[k])) for k in before}
    assert after["dataset"] == before["dataset"] and after["checkpoint"] == before["checkpoint"]
    assert after["eval"] > before["eval"]


def test_rebuild_forces_that_stage_kind_and_downstream_in_every_arm():
    from flows import status
    from flows.presets import reproduce_preset

    p = reproduce_preset("tiny")
    names = status.stage_names(p)
    assert names == ["dataset", "train", "eval", "train-clip", "eval-clip"]
    assert status.forced_stages("dataset", names) == set(names)
    assert status.forced_stages("train", names) == {"train", "eval", "train-clip", "eval-clip"}
    assert status.forced_stages("eval", names) == {"eval", "eval-clip"} and status.forced_stages(None, names) == set()
    alone = status.effective_preset(status.Request(baselines=False), p)
    assert status.stage_names(alone) == ["dataset", "train", "eval"]
