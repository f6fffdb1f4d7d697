"""Multi-node training: torchrun with c10d rendezvous across two "nodes" on localhost (gloo, CPU).

Two separate `python -m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d` launchers
(each its own process tree, as on two machines; node A hosts the rendezvous store) train the same tiny
SLIP on real shards into one shared run folder. The result must equal a single-node
`--standalone --nproc_per_node=2` run of the same config: same world size and seed, so the final
parameters are bit-identical and so is every logged loss/accuracy.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from slip_core import config as cfgmod
from slip_core import trainer as T
from slip_core.checkpoint import load_state
from slip_core.registry import build_model
from tests._train_util import fashion_samples, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A very small SLIP (32 px, 2 ViT blocks, 1 text layer): the launchers dominate the time, not the steps.
SMALL = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}
STEPS = 6
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch: list[str], ds: str, out: str, cfg_path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--max-restarts=0", "--monitor-interval=0.5",
           "-m", "slip_core.trainer", "--dataset", ds, "--out", out, "--config-json", cfg_path, "--resume", "none"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_nodes_c10d_equal_one_node_two_processes(tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), fashion_samples(96, seed=5), per_shard=16)
    cfg = T.TrainConfig(model="SLIP_VIT_TINY", model_overrides=SMALL, epochs=1, samples_per_epoch=96, batch_size=8,
                        lr=2e-3, weight_decay=0.1, warmup_epochs=0.3, num_workers=0, log_every=1, ckpt_every=3,
                        shuffle_chunk=16, threads=1, seed=7)
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfgmod.to_dict(cfg), f)

    multi, single = str(tmp_path / "multinode"), str(tmp_path / "standalone")
    port = _free_port()
    node = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=slip-test-{port}"]
    # Node A hosts the c10d store, node B joins it (on two machines: same command, endpoint = node A).
    logs = _finish([_torchrun(node + ["--rdzv_conf=is_host=1,join_timeout=120"], ds, multi, cfg_path),
                    _torchrun(node + ["--rdzv_conf=is_host=0,join_timeout=120"], ds, multi, cfg_path)])
    assert sum("training SLIP_VIT_TINY" in log for log in logs) == 1  # exactly one global rank 0
    _finish([_torchrun(["--standalone", "--nproc_per_node=2"], ds, single, cfg_path)])

    for out in (multi, single):
        final = json.load(open(os.path.join(out, "final_metrics.json")))
        assert final["world_size"] == 2 and final["global_batch"] == 16 and final["steps"] == STEPS
        assert [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 1))  # loss log complete
        state = load_state(os.path.join(out, "checkpoints", f"step_{STEPS:08d}.pt"))
        ts = state["train_state"]  # both ranks' RNG, the rank-independent data position of 8 streams
        assert set(ts["rng"]) == {"0", "1"} and len(ts["loader"]["positions"]) == ts["loader"]["streams"] == 8
    a = load_state(os.path.join(multi, "checkpoint.pt"))["state_dict"]
    b = load_state(os.path.join(single, "checkpoint.pt"))["state_dict"]
    torch.manual_seed(cfg.seed)  # the trainer's initialisation, exactly
    init = build_model("SLIP_VIT_TINY", **SMALL).state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]  # bit-identical parameters
    assert init.keys() == a.keys() and any(not torch.equal(a[k], init[k]) for k in a)  # training moved them
    keys = ("loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc", "lr")
    assert [[r[k] for k in keys] for r in _metrics(multi)] == [[r[k] for k in keys] for r in _metrics(single)]
