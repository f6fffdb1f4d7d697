"""Evaluation on devices (issue 17 item 1), on CPU: the device option, and zero-shot / linear-probe features
extracted across 2 gloo ranks under torchrun equal to the single-process features, for a map-style split
(ImageFolder, sliced by index) and a CLIP_benchmark webdataset split (sliced by shard); the CLI's --nproc."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datasets import catalog
from evaluation import common
from evaluation.tasks import EvalConfig
from slip_core import config as cfg_util
from slip_core.distributed import local_device
from slip_core.features import autocast, extract, precision, rank_slice
from tests._eval_util import random_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "dist_scripts" / "eval_features.py"


def write_digits_wds(root: Path, shards: int = 3, per_shard: int = 30) -> Path:
    """CLIP_benchmark's webdataset layout of sklearn digits: <root>/digits/test/{0..n-1}.tar + nshards.txt."""
    images, labels = catalog.offline.sklearn_digits()
    split = root / "digits" / "test"
    split.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(split / f"{s}.tar")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()})
    (split / "nshards.txt").write_text(f"{shards}\n")
    (root / "digits" / "classnames.txt").write_text("\n".join(str(i) for i in range(10)))
    return root


def test_device_option_resolution():
    assert local_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert local_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(cfg_util.ConfigError, match="unknown device"):
            local_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(cfg_util.ConfigError, match="CUDA is not available"):
            local_device("cuda")
    assert EvalConfig().device == "auto"
    with pytest.raises(cfg_util.ConfigError, match="device"):
        cfg_util.from_dict(EvalConfig, {"device": "tpu"})
    assert precision("cpu") == "fp32" and precision("cuda") == "bf16"
    with autocast("cpu"):  # fp32 on CPU: no autocast region
        assert not torch.is_autocast_enabled("cpu")


def test_rank_slices_cover_the_dataset_once():
    data = list(range(10))
    parts = [list(rank_slice(data, r, 3)) for r in range(3)]
    assert sum(parts, []) == data and [len(p) for p in parts] == [3, 3, 4]


def test_two_gloo_ranks_extract_the_single_process_features(tmp_path):
    ckpt = random_checkpoint()
    data_root = tmp_path / "data"
    catalog.prepare("digits", str(data_root))
    wds_root = write_digits_wds(tmp_path / "wds")
    out = tmp_path / "dist.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), ckpt,
           str(data_root), str(wds_root), str(tmp_path / "dist-cache"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    dist = np.load(out)
    lm = common.load_model(ckpt)
    worst = 0.0
    for tag, root in (("folder", data_root), ("wds", wds_root)):
        for kind, tf in (("embed", common.zeroshot_transform(64)), ("visual", common.probe_eval_transform(64))):
            loaded = catalog.load("digits", "test", tf, str(root), max_samples=150 if tag == "folder" else None)
            x, y = common.features(lm, loaded, kind, batch_size=16, cache_dir=str(tmp_path / "single-cache"))
            for attempt in ("computed", "cached"):
                dx, dy = dist[f"{tag}-{kind}-{attempt}-x"], dist[f"{tag}-{kind}-{attempt}-y"]
                assert dx.shape == x.shape and np.array_equal(dy, y), (tag, kind, attempt)
                worst = max(worst, float(np.abs(dx - x).max()))
    assert x.shape[0] == 90 and len(np.unique(y)) == 10
    print(f"\n2 gloo ranks vs 1 process, features max abs diff: {worst:.3g}")
    assert worst < 1e-5


def test_cli_nproc_two_gives_the_single_process_record(tmp_path):
    ckpt = random_checkpoint()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIP_EVAL_CACHE": str(tmp_path / "cache")}
    records = {}
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}.json"
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "zeroshot", "--checkpoint", ckpt,
                               "--dataset", "digits", "--data-root", str(tmp_path / "data"), "--max-samples", "120",
                               "--device", "cpu", "--nproc", str(nproc), "--out", str(out),
                               "--cache-dir", str(tmp_path / f"cache{nproc}")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert proc.stdout.count('"task": "zeroshot"') == 1  # only rank 0 prints its record
        [records[nproc]] = json.loads(out.read_text())
    one, two = records[1], records[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["device"] == two["device"] == "cpu" and one["precision"] == "fp32"
    assert one["num_samples"] == two["num_samples"] == 120 and one["value"] == two["value"]


def test_extract_refuses_an_iterable_it_cannot_split():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3), 0

    with pytest.raises(TypeError, match="cannot be split across ranks"):
        rank_slice(Stream(), 0, 2)
    x, y = extract(lambda b: b, Stream())  # one process: any iterable works
    assert x.shape == (1, 3) and y.tolist() == [0]
