"""The Prefect flow against a real Prefect server: `slip dataset build` from the CLI, then the same build as
a subflow of another flow, which must be a cache hit (filter + publish Cached, nothing downloaded)."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import pytest

from datasets.httpserve import serve_directory
from slip_core import artifacts
from tests._dataset_util import TEST_CONFIG, Row, write_images, write_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.prefect


def test_flow_cli_then_cached_subflow(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from prefect.settings import PREFECT_API_URL

    from flows.build_dataset import build_dataset

    img_dir = str(tmp_path / "images")
    images = write_images(img_dir, n_photos=2, n_fashion=6)
    hits = collections.Counter()
    with serve_directory(img_dir, faults=True, hits=hits) as base:
        rows = [Row(f"{base}/{rel}", t, d) for rel, t, d in images] + [Row(f"{base}/_fault/404", "gone")]
        corpus = write_metadata(str(tmp_path / "meta"), str(tmp_path / "subset.tsv"), rows)
        store = str(tmp_path / "store")
        sets = [f"--set={k}={v}" for k, v in {**TEST_CONFIG, "name": "flowtest"}.items()]
        r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "build", corpus.metadata, "--store", store,
                            "--subset", corpus.subset, "--preset", "tiny", *sets],
                           cwd=REPO, capture_output=True, text=True, timeout=400,
                           env=dict(os.environ, PYTHONPATH=REPO, PREFECT_API_URL=PREFECT_API_URL.value()))
        assert r.returncode == 0, r.stderr[-3000:]
        murl = r.stdout.strip().splitlines()[-1]
        m = artifacts.load_verified(murl)
        assert m.kind == "dataset" and m.metrics["num_samples"] == 8 and m.metrics["n_failed_to_download"] == 1
        fetched = sum(hits.values())

        @flow
        def parent(config: dict):
            state = build_dataset(corpus.metadata, store, config=config, subset=corpus.subset, return_state=True)
            return state.state_details.flow_run_id, state.result()

        # The first in-process run may republish (the code version hashes the source tree, which other
        # work can change between the two processes); nothing is downloaded again either way.
        _, murl1 = parent({**TEST_CONFIG, "name": "flowtest", "preset": "tiny"})
        t0 = time.time()
        run_id, murl2 = parent({**TEST_CONFIG, "name": "flowtest", "preset": "tiny"})
        elapsed = time.time() - t0
    assert murl2 == murl1 and sum(hits.values()) == fetched  # same artifact, nothing downloaded again
    assert artifacts.load_verified(murl1).files == m.files  # byte-identical shards, ledger, sizes, stats
    assert elapsed < 30, elapsed
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        states = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in runs}
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "dataset-flowtest-summary", "dataset-flowtest-reasons"])))
    assert states["filter"] == "Cached" and states["publish"] == "Cached", states
    assert "download" not in states
    assert {a.key for a in arts} == {"dataset-flowtest-summary", "dataset-flowtest-reasons"}
    summary = next(a for a in arts if a.key == "dataset-flowtest-summary")
    assert "success rate: 88.89 %" in summary.data
