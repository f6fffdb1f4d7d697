"""`slip study` at test size: 2 seeds of SLIP, CLIP and SimCLR (4 steps of a 2-block 32 px ViT) plus CLIP at
SLIP's wall time, on the tiny pipeline's dataset artifact; the report's structure, and a second call that
trains and evaluates nothing (every run is a cached artifact)."""
import json
import os

import pytest

from evaluation import comparison
from slip_core import artifacts, storage
from tests._stage_runs import TINY_CORPUS, tiny_pipeline

pytestmark = pytest.mark.prefect

STUDY_TRAIN = {"model_overrides": {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64,
                                   "ssl_emb_dim": 32},
               "max_steps": 4, "log_every": 1, "ckpt_every": 4, "num_workers": 0}
STUDY_EVAL = {"zeroshot": ["digits"], "linear": ["digits"], "retrieval": [], "max_samples": 60, "max_train_samples": 100}
METHODS = ["SLIP", "CLIP", "SIMCLR", "CLIP @ SLIP wall time"]


def _manifests(store: str) -> dict[str, float]:
    out = {}
    for dirpath, _, names in os.walk(store):
        if "manifest.json" in names:
            out[os.path.join(dirpath, "manifest.json")] = os.path.getmtime(os.path.join(dirpath, "manifest.json"))
    return out


@pytest.fixture(scope="module")
def studied(prefect_server):
    from flows.study import study

    store, _ = tiny_pipeline(prefect_server)  # its dataset artifact: the study adds artifacts, alters none
    args = dict(preset="tiny", seeds=2, store=store, train_config=STUDY_TRAIN, eval_config=STUDY_EVAL,
                demo_corpus=TINY_CORPUS)
    first = study(**args)
    return store, args, first


def test_study_report_has_mean_and_std_per_method_and_metric(studied):
    store, _, r = studied
    assert [(x["method"], x["seed"]) for x in r["runs"]] == [(m, s) for s in (0, 1) for m in METHODS]
    for x in r["runs"]:
        assert artifacts.verify(x["checkpoint"]) == [] and artifacts.verify(x["eval"]) == []
    slip0, slip1 = (x for x in r["runs"] if x["method"] == "SLIP")
    assert slip0["checkpoint"] != slip1["checkpoint"]  # the seed is part of the run's identity
    datasets = {artifacts.load_manifest(x["checkpoint"]).upstream["dataset"].sha256 for x in r["runs"]}
    assert len(datasets) == 1  # every method on the one dataset artifact
    saved = json.loads(storage.read_text(storage.join(artifacts.artifact_root(r["report"]), "study.json")))
    summary = {row["method"]: row for row in saved["summary"]}
    assert list(summary) == METHODS
    assert "zeroshot/digits" not in summary["SIMCLR"]["results"]  # no text tower: not evaluated, not a 0
    for m in ("SLIP", "CLIP"):
        for key in ("zeroshot/digits", "linear/digits"):
            cell = summary[m]["results"][key]
            vals = [x["results"][key] for x in r["runs"] if x["method"] == m]
            assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(vals) / 2)
            assert cell["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
        assert summary[m]["train_time_s"]["n"] == 2 and summary[m]["samples_per_s"]["mean"] > 0
    walltime = [x for x in r["runs"] if x["method"] == "CLIP @ SLIP wall time"]
    clip = [x for x in r["runs"] if x["method"] == "CLIP"]
    assert all(w["steps"] >= c["steps"] for w, c in zip(walltime, clip))
    md = r["markdown"]
    assert "| method | zeroshot/digits | linear/digits | steps | train wall time (s) | samples/s |" in md
    assert md.count(" ± ") >= 4 * 2 and "| SLIP | 42.8 | 72.1 | 82.6 |" in md  # ours, then the paper's rows


def test_second_study_call_runs_nothing(studied):
    from flows.study import study

    store, args, first = studied
    before = _manifests(store)
    again = study(**args)
    assert again["report"] == first["report"]
    assert [(x["checkpoint"], x["eval"]) for x in again["runs"]] == [(x["checkpoint"], x["eval"]) for x in first["runs"]]
    assert _manifests(store) == before  # no artifact published or rewritten


def test_aggregate_gives_sample_std_and_keeps_missing_cells_missing():
    runs = [{"method": "CLIP", "model": "m", "results": {"a": 1.0, "b": 4.0}, "steps": 4, "train_time_s": 2.0,
             "samples_per_s": None},
            {"method": "CLIP", "model": "m", "results": {"a": 3.0}, "steps": 4, "train_time_s": 4.0, "samples_per_s": None}]
    (row,) = comparison.aggregate(runs)
    assert row["results"]["a"] == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert row["results"]["b"] == {"mean": 4.0, "std": 0.0, "n": 1} and row["samples_per_s"] is None
    assert comparison.fmt(row["results"]["a"]) == "2.0 ± 1.4"
