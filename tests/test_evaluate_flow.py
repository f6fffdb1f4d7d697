"""The evaluation flow on a real Prefect server: checkpoint artifact -> eval artifact (results.json, reports),
one cached task per (task, dataset), a missing dataset recorded rather than fatal."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
import torch

from slip_core import artifacts, storage
from tests._eval_util import tiny_checkpoint

torch.set_num_threads(1)  # 2 shared cores: busy-waiting intra-op threads slow everything down

pytestmark = pytest.mark.prefect


def _checkpoint_artifact(store: str) -> str:
    root = os.path.join(store, "checkpoint", "tiny")
    os.makedirs(root, exist_ok=True)
    shutil.copy(tiny_checkpoint()["path"], os.path.join(root, "checkpoint.pt"))
    m = artifacts.build_manifest(root, ["checkpoint.pt"], kind="checkpoint", name="clip_vit_tiny",
                                 config={"epochs": 1})
    return artifacts.publish(m, root)


def test_evaluate_flow_tiny(prefect_server, tmp_path, monkeypatch):
    from flows.evaluate import EVAL_PRESETS, evaluate

    monkeypatch.setenv("SLIP_EVAL_CACHE", str(tmp_path / "cache"))
    assert set(EVAL_PRESETS["tiny"].zeroshot) == {"fashion_mnist", "mnist", "digits"}
    store = str(tmp_path / "store")
    ckpt = _checkpoint_artifact(store)
    config = {"max_samples": 300, "max_train_samples": 600, "zeroshot": ["fashion_mnist", "digits", "cifar10"],
              "linear": ["fashion_mnist"], "retrieval": ["photos"]}
    state = evaluate(checkpoint=ckpt, store=store, config=config, preset="tiny", return_state=True)
    url = state.result()
    m = artifacts.load_verified(url)
    assert m.kind == "eval" and m.upstream["checkpoint"].sha256 == artifacts.load_manifest(ckpt).sha256
    assert {f.path for f in m.files} == {"results.json", "report.md", "report.html", "results.png"}
    root = artifacts.artifact_root(url)
    results = json.loads(storage.read_text(storage.join(root, "results.json")))
    by = {(r["task"], r["dataset"]): r for r in results}
    assert set(by) == {("zeroshot", "fashion_mnist"), ("zeroshot", "digits"), ("zeroshot", "cifar10"),
                       ("linear", "fashion_mnist"), ("retrieval", "photos")}
    zs = by[("zeroshot", "fashion_mnist")]
    assert zs["model"] == "CLIP_VIT_TINY" and zs["num_samples"] == 300 and len(zs["checkpoint_sha256"]) == 64
    assert zs["value"] > 25.0 and len(zs["dataset_sha256"]) == 64
    assert zs["prompt_source"] == "ours" and zs["device"] == "cpu" and zs["precision"] == "fp32"
    assert by[("linear", "fashion_mnist")]["value"] > 50.0
    assert by[("zeroshot", "cifar10")]["value"] is None and "not found" in by[("zeroshot", "cifar10")]["reason"]
    md = storage.read_text(storage.join(root, "report.md"))
    assert "| zeroshot | fashion_mnist | top1 |" in md and "Paper vs ours" in md and "Not evaluated" in md
    assert m.metrics["zeroshot/fashion_mnist"] == zs["value"]

    # second run: same artifact, every (task, dataset) served from Prefect's cache
    state2 = evaluate(checkpoint=ckpt, store=store, config=config, preset="tiny", return_state=True)
    assert state2.result() == url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def states(fid):
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
        return [r.state.name for r in runs if r.name.startswith("eval-") and "fingerprint" not in r.name]

    second = asyncio.run(states(state2.state_details.flow_run_id))
    assert len(second) == 5 and all(s == "Cached" for s in second), second
    # a bad preset, device or reference-prompts folder fails before anything runs
    with pytest.raises(ValueError, match="unknown eval preset"):
        evaluate(checkpoint=ckpt, store=store, preset="nope")
    with pytest.raises(ValueError, match="device"):
        evaluate(checkpoint=ckpt, store=store, config={"device": "tpu"})
    with pytest.raises(ValueError, match="missing templates.json, labels.json"):
        evaluate(checkpoint=ckpt, store=store, config={"reference_prompts": str(tmp_path / "no-such-folder")})


def test_report_paper_table_only_for_matching_configs():
    from evaluation import report

    results = [{"dataset": "imagenet", "task": "zeroshot", "model": "SLIP_VITB16", "metric": "top1", "value": 40.0,
                "chance": 0.1, "num_samples": 50000},
               {"dataset": "imagenet", "task": "linear", "model": "SLIP_VITB16", "metric": "top1", "value": 70.0},
               {"dataset": "cifar10", "task": "zeroshot", "model": "SLIP_VITB16", "metric": "top1", "value": 60.0},
               {"dataset": "food101", "task": "zeroshot", "model": "SLIP_VITB16", "value": None, "reason": "missing"}]
    rows = report.paper_rows(results, {"dataset": "yfcc15m", "epochs": 25})
    assert [(r["task"], r["paper"], r["delta"]) for r in rows] == [("zeroshot", 42.8, -2.8), ("linear", 72.1, -2.1)]
    assert report.paper_rows(results, {"dataset": "cc3m", "epochs": 40})[0]["paper"] == 23.0
    assert report.paper_rows([{**results[0], "model": "CLIP_VIT_TINY"}]) == []
    md = report.to_markdown(results, "t", {"dataset": "yfcc15m", "epochs": 25})
    assert "| SLIP_VITB16 | yfcc15m | 25 | zeroshot | 42.80 | 40.00 | -2.80 |" in md
    assert "| zeroshot | food101 | missing |" in md
    html = report.to_html(results, "t", {"dataset": "yfcc15m", "epochs": 25})
    assert html.count("<img") == 1 and "42.80" in html
