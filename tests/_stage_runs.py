"""Stage runs shared by several test modules (each run once per session).

`tiny_pipeline`: the reproduce chain at test size (demo corpus of 240 Fashion-MNIST rows + photos through
img2dataset, 12 training steps, two evaluations), used by tests/test_reproduce.py and
tests/test_stage_identity.py. Its users only add artifacts or rebuild ones byte-identically, never
remove or alter what another user relies on (the base-code artifacts of the three stages).

Every stage is started twice at the same moment as real `slip` CLI processes against the session's Prefect
server: pretraining into a local store, then evaluation of that checkpoint read from and published to s3://
on a real S3-compatible server (moto, 127.0.0.1). The processes carry distinctive credentials
(AWS_SECRET_ACCESS_KEY, PREFECT_API_KEY) generated per session, so the security tests can look for them in
everything the runs left behind; the concurrency tests check the store the pair left.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from slip_core import artifacts, storage
from tests._s3_util import s3_server
from tests._train_util import fashion_samples, write_dataset

SLIP = os.path.join(os.path.dirname(sys.executable), "slip")
STAGE_TIMEOUT_S = 150
# Generated at run time, never written in code: a hit in any output can only be a leak.
SECRETS = {"AWS_SECRET_ACCESS_KEY": f"slipSecret{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}",
           "PREFECT_API_KEY": f"pnu_slipKey{uuid.uuid4().hex}"}
ACCESS_KEY_ID = f"SLIPTEST{uuid.uuid4().hex[:12].upper()}"
# 4 steps of a 2-block 32 px SLIP: enough to checkpoint mid-run (ckpt_every=2) and cheap on 2 CPU cores.
TRAIN_SETS = {"model_overrides": {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64,
                                  "ssl_emb_dim": 32},
              "epochs": 1, "samples_per_epoch": 64, "batch_size": 16, "num_workers": 0, "log_every": 1,
              "ckpt_every": 2, "warmup_epochs": 0.5, "shuffle_chunk": 30}
EVAL_SETS = {"zeroshot": ["digits"], "linear": [], "retrieval": [], "max_samples": 60}


def sets(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def stage_env(prefect_api: str) -> dict:
    """The environment of a stage process: ours (with the S3 endpoint inside s3_server()), the session's Prefect
    server (logs sent to it), one intra-op thread (2 shared cores), and the distinctive credentials."""
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_TO_API_ENABLED": "true",
            "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, **SECRETS}


def run_pair(cmd: list[str], env: dict, hold_root: str | None = None,
             timeout_s: float = STAGE_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Start the same command twice at once; wait for both (killing both past `timeout_s`).

    `hold_root`: hold that stage root's lock until both processes say they are waiting for it, then let
    them race for it from the same moment (a start line: without it a short stage might finish before
    the other process, still importing, ever reaches the lock)."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outs: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True) for p, o in zip(procs, outs)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout_s
    try:
        if hold_root:
            with artifacts.stage_lock(hold_root):
                while not all(any("waiting for it to finish" in ln for ln in list(o)) for o in outs):
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        break  # the caller's assertions show what happened
                    time.sleep(0.1)
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in readers:
            t.join(timeout=10)
    return [subprocess.CompletedProcess(cmd, p.returncode, "".join(o), "") for p, o in zip(procs, outs)]


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


@dataclass
class TrainPair:
    dataset: str
    store: str
    runs: list[subprocess.CompletedProcess]


@dataclass
class EvalPair:
    checkpoint: str  # s3:// manifest URL the pair evaluated
    store: str  # s3:// store the pair published into
    runs: list[subprocess.CompletedProcess]
    objects: dict[str, bytes] = field(default_factory=dict)  # everything under the pair's store afterwards
    problems: list[str] = field(default_factory=list)  # verify() of the published eval artifact
    single: dict[str, bytes] = field(default_factory=dict)  # files a single uncontended run published


TINY_TRAIN = {"max_steps": 12, "log_every": 2, "ckpt_every": 6, "num_workers": 0}
TINY_EVAL = {"zeroshot": ["fashion_mnist"], "linear": ["fashion_mnist"], "retrieval": [], "max_samples": 300,
             "max_train_samples": 600}
TINY_CORPUS = {"n_fashion": 240}


def tiny_sets() -> list[str]:
    """The same run as `slip reproduce --set STAGE.KEY=VALUE` arguments."""
    return sets({**{f"train.{k}": v for k, v in TINY_TRAIN.items()}, **{f"eval.{k}": v for k, v in TINY_EVAL.items()},
                 **{f"corpus.{k}": v for k, v in TINY_CORPUS.items()}})


@functools.lru_cache(maxsize=1)
def tiny_pipeline(prefect_api: str) -> tuple[str, dict]:
    """(store, URLs of dataset/checkpoint/eval/report) of the session's tiny reproduce run."""
    from flows.reproduce import reproduce

    store = os.path.join(tempfile.mkdtemp(prefix="slip-tiny-"), "store")
    return store, reproduce(preset="tiny", store=store, train_config=TINY_TRAIN, eval_config=TINY_EVAL,
                            demo_corpus=TINY_CORPUS)


@functools.lru_cache(maxsize=1)
def train_pair(prefect_api: str) -> TrainPair:
    tmp = tempfile.mkdtemp(prefix="slip-conc-")
    dataset = write_dataset(os.path.join(tmp, "dataset"), fashion_samples(80, seed=7), per_shard=40)
    store = os.path.join(tmp, "store")
    cmd = [SLIP, "train", "--dataset", dataset, "--out", store, "--preset", "tiny", "--retries", "0",
           "--timeout", str(STAGE_TIMEOUT_S), *sets(TRAIN_SETS)]
    return TrainPair(dataset, store, run_pair(cmd, stage_env(prefect_api)))


@functools.lru_cache(maxsize=1)
def eval_pair_s3(prefect_api: str) -> EvalPair:
    """Copy the trained checkpoint to s3:// as an artifact, evaluate it once alone into one prefix, then run
    `slip eval run` twice at once into another and snapshot what the pair left there."""
    from datasets import catalog
    from flows.evaluate import evaluate

    tp = train_pair(prefect_api)
    local = last_json(tp.runs[0].stdout)["checkpoint"]
    catalog.prepare("digits")  # the shared offline set exists before the race (its own race is tested elsewhere)
    with s3_server() as bucket:
        ckpt_root = storage.join(bucket, "store/checkpoint/tiny")
        storage.put_file_atomic(storage.join(artifacts.artifact_root(local), "checkpoint.pt"),
                                storage.join(ckpt_root, "checkpoint.pt"))
        ckpt = artifacts.publish(artifacts.build_manifest(ckpt_root, ["checkpoint.pt"], kind="checkpoint",
                                                          name="slip_vit_tiny"), ckpt_root)
        # One uncontended run first: the files to compare with, and the name of the root the pair will share
        # (stage roots are content-addressed, so only the store prefix differs).
        single = evaluate(checkpoint=ckpt, store=storage.join(bucket, "single"), config=EVAL_SETS, preset="tiny")
        single_root = artifacts.artifact_root(single)
        store = storage.join(bucket, "store")
        cmd = [SLIP, "eval", "run", "--checkpoint", ckpt, "--store", store, "--preset", "tiny", *sets(EVAL_SETS)]
        shared_root = storage.join(store, "eval", single_root.rsplit("/", 1)[-1])
        pair = EvalPair(ckpt, store, run_pair(cmd, stage_env(prefect_api), hold_root=shared_root))
        fs, path = storage.url_to_fs(bucket)
        pair.objects = {p: fs.cat_file(p) for p in fs.find(path) if p.startswith(f"{path}/store/")}
        pair.single = {f.path: storage.read_bytes(storage.join(single_root, f.path))
                       for f in artifacts.load_manifest(single).files}
        url = last_json(pair.runs[0].stdout).get("eval")
        if url:
            pair.problems = artifacts.verify(url)
    return pair
