"""Trainer on real shards, CPU: learning in all three modes, exact resume after SIGKILL, 2-process gloo DDP."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slip_core import config as cfgmod
from slip_core import trainer as T
from slip_core.checkpoint import load_checkpoint, load_state
from slip_core.optim import lr_at, param_groups
from slip_core.registry import build_model
from slip_core.train_config import epoch_steps, plan_batch
from tests._train_util import fashion_samples, photo_samples, write_dataset

# A very small SLIP (32 px, 2 ViT blocks, 1 text layer) so that every step costs ~0.1 s on one core.
SMALL = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("trainds"))
    return write_dataset(root, fashion_samples(300, seed=3) + photo_samples(short_side=96), per_shard=40)


def small_cfg(model="SLIP_VIT_TINY", **kw) -> T.TrainConfig:
    base = dict(model=model, model_overrides=SMALL, epochs=1, samples_per_epoch=320, batch_size=16, lr=2e-3,
                weight_decay=0.1, warmup_epochs=0.2, num_workers=0, log_every=1, ckpt_every=1000,
                shuffle_chunk=40, threads=1)
    return T.TrainConfig(**{**base, **kw})


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _falls(recs: list[dict], key: str) -> bool:
    vals = [r[key] for r in recs]
    return sum(vals[-5:]) / 5 < sum(vals[:5]) / 5 - 0.05


# ------------------------------------------------------------------------------------------- units
def test_lr_schedule_and_param_groups():
    total, warm = 100, 10
    lrs = [lr_at(s, total, warm, 3e-3) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[warm - 1] == pytest.approx(3e-3)  # linspace endpoints
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert lrs[warm] == pytest.approx(3e-3) and lrs[total] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    model = build_model("SLIP_VIT_TINY")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert {"visual.cls_token", "visual.pos_embed", "token_embedding.weight", "positional_embedding",
            "image_projection", "image_mlp.layer1.weight"} <= dn  # SPEC §9.5: decayed by the name+rank rule
    assert {"logit_scale", "image_mlp.bn1.weight", "ln_final.weight", "visual.blocks.0.attn.qkv.bias"} <= nn_
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_presets_and_paper_step_count():
    assert {"tiny", "clip_tiny", "simclr_tiny", "slip_vitb16_yfcc15m_25ep", "clip_vits16_yfcc15m_25ep",
            "slip_vitb16_cc3m_40ep"} <= set(T.TRAIN_PRESETS)
    paper = T.resolve(T.TRAIN_PRESETS["slip_vitb16_yfcc15m_25ep"])
    assert (paper.lr, paper.weight_decay, paper.betas, paper.eps) == (3e-3, 0.1, (0.9, 0.98), 1e-8)
    assert T.resolve(T.TRAIN_PRESETS["clip_vitb16_yfcc15m_25ep"]).weight_decay == 0.5
    # SPEC §9.7: 14,689,580 samples, 64 ranks × 64 → 3,586 steps/epoch, 25 epochs = 89,650 steps
    plan = plan_batch(paper.global_batch, world=64, max_micro=paper.batch_size, num_workers=paper.num_workers)
    assert (plan.micro, plan.accum, plan.streams, plan.workers) == (64, 1, 512, 8)
    assert epoch_steps(14_689_580, plan) == 3586 and not paper.resampled  # full passes, as the reference
    assert cfgmod.from_dict(T.TrainConfig, cfgmod.to_dict(paper)) == paper
    assert cfgmod.parse_sets(["lr=0.001", "model=CLIP_VIT_TINY", "betas=[0.9, 0.95]"]) == {
        "lr": 0.001, "model": "CLIP_VIT_TINY", "betas": [0.9, 0.95]}


# ------------------------------------------------------------------------------------------- learning
def test_tiny_slip_learns_on_real_shards(ds, tmp_path):
    torch.set_num_threads(1)
    final = T.train(small_cfg(), ds, str(tmp_path), resume=None)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert _falls(recs, "loss") and _falls(recs, "clip_loss") and _falls(recs, "ssl_loss")
    for key in ("loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc", "lr", "samples_per_s", "data_time"):
        assert key in recs[-1] and math.isfinite(recs[-1][key])
    assert final["steps"] == 20 and 0 < recs[-1]["logit_scale"] <= 100.0001
    model = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert model.config.kind == "slip" and model.config.image_size == 32


@pytest.mark.parametrize("model,losses", [("CLIP_VIT_TINY", ("clip_loss",)), ("SIMCLR_VIT_TINY", ("ssl_loss",))])
def test_single_objective_modes(ds, tmp_path, model, losses):
    torch.set_num_threads(1)
    T.train(small_cfg(model), ds, str(tmp_path), resume=None)
    recs = read_metrics(tmp_path)
    assert _falls(recs, "loss")
    present = {k for k in ("clip_loss", "ssl_loss") if k in recs[-1]}
    assert present == set(losses)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt")).config.kind == model.split("_")[0].lower()


def test_non_finite_loss_stops_training(ds, tmp_path):
    torch.set_num_threads(1)
    cfg = small_cfg(lr=1e12, start_lr=1e12, warmup_epochs=0, samples_per_epoch=160)
    with pytest.raises(T.NonFiniteLoss):
        T.train(cfg, ds, str(tmp_path), resume=None)


# ------------------------------------------------------------------------------------------- resume
def _launch(cfg_path: str, ds: str, out: str, extra: list[str] | None = None, nproc: int = 1,
            module: str = "slip_core.trainer") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", module] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    cmd += ["--dataset", ds, "--out", out, "--config-json", cfg_path, *(extra or [])]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_at_step(proc: subprocess.Popen, out: str, step: int, timeout: float = 120) -> int:
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip()]
            if steps and steps[-1] >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return steps[-1]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_at_three_steps_then_resume_is_bit_identical(ds, tmp_path, fault_log):
    # 3 epochs of 8 steps (epoch boundaries are crossed), checkpoints every 3 steps, 2 loader workers, and
    # evaluation during training (evaluation.train_entry: zero-shot on 40 Fashion-MNIST test images every 4 steps).
    cfg = small_cfg(epochs=3, samples_per_epoch=128, num_workers=2, ckpt_every=3, warmup_epochs=0.5,
                    eval_every_steps=4, eval_dataset="fashion_mnist", eval_max_samples=40)
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfgmod.to_dict(cfg), f)
    ref_dir, run_dir, entry = str(tmp_path / "ref"), str(tmp_path / "run"), "evaluation.train_entry"
    ref = _launch(cfg_path, ds, ref_dir, module=entry)  # uninterrupted reference, same launcher
    killed_at = []
    for target in (5, 11, 17):  # between checkpoints (3, 6, 9, ...): work after the checkpoint is lost
        killed_at.append(_kill_at_step(_launch(cfg_path, ds, run_dir, module=entry), run_dir, target))
    last = _launch(cfg_path, ds, run_dir, module=entry)
    out_last, _ = last.communicate(timeout=300)
    out_ref, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out_ref
    assert last.returncode == 0, out_last
    assert "resumed from" in out_last and len(set(killed_at)) == 3, (killed_at, out_last)
    a = load_state(os.path.join(ref_dir, "checkpoint.pt"))["state_dict"]
    b = load_state(os.path.join(run_dir, "checkpoint.pt"))["state_dict"]
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"parameters differ after resume: {diff[:5]}"
    ref_all, run_all = read_metrics(ref_dir), read_metrics(run_dir)
    ref_m, run_m = ([r for r in m if "loss" in r] for m in (ref_all, run_all))
    assert [r["step"] for r in run_m] == list(range(1, 25))  # no gap, no duplicate
    for x, y in zip(ref_m, run_m):
        assert (x["loss"], x["clip_acc"], x["ssl_loss"], x["lr"]) == (y["loss"], y["clip_acc"], y["ssl_loss"], y["lr"])
    # the evaluations and the best-so-far resume exactly too (eval_seconds aside)
    ref_e, run_e = ([{k: v for k, v in r.items() if k != "eval_seconds"} for r in m if "eval_metric" in r]
                    for m in (ref_all, run_all))
    assert [r["step"] for r in run_e] == [4, 8, 12, 16, 20, 24] and run_e == ref_e
    best = load_state(os.path.join(run_dir, "checkpoint.pt"))["train_state"]["extra"]["best"]
    assert best == load_state(os.path.join(ref_dir, "checkpoint.pt"))["train_state"]["extra"]["best"]
    a_best, b_best = (load_state(os.path.join(d, "checkpoint_best.pt")) for d in (ref_dir, run_dir))
    assert a_best["best"] == b_best["best"] == best
    assert [k for k in a_best["state_dict"] if not torch.equal(a_best["state_dict"][k], b_best["state_dict"][k])] == []
    ck = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    # keep_checkpoints=2, pointer last, and the best step's weights
    assert ck == sorted(["latest", "step_00000021.pt", "step_00000024.pt", f"best_step_{best['step']:08d}.pt"])
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    for target in (5, 11, 17):
        fault_log.record("kill", "train", f"SIGKILL of the trainer (2 loader workers) at step >= {target}, between "
                         "checkpoints, evaluation during training on", f"resumed from the last checkpoint; after 3 kills "
                         f"final parameters bit-identical to an uninterrupted run ({len(a)} tensors), metrics steps "
                         f"1..{len(run_m)} with no gap or duplicate and equal losses, the same {len(run_e)} zero-shot "
                         "evaluations, best step and checkpoint_best.pt, no temp files", bound="< 300 s")


def test_resampled_shards_resume_exactly_across_an_epoch_boundary(ds, tmp_path, capsys):
    """Shard resampling with replacement (resampled=true) keeps exact resume: cut mid-epoch 0, resume, cross
    into epoch 1 = an uninterrupted run, bit for bit."""
    torch.set_num_threads(1)
    base = dict(epochs=2, samples_per_epoch=64, resampled=True, ckpt_every=1000)
    T.train(small_cfg(**base), ds, str(tmp_path / "full"), resume=None)
    T.train(small_cfg(**base, max_steps=3), ds, str(tmp_path / "cut"), resume=None)
    capsys.readouterr()
    T.train(small_cfg(**base), ds, str(tmp_path / "cut"))
    assert "at step 3" in capsys.readouterr().out
    a, b = (load_state(str(tmp_path / d / "checkpoint.pt")) for d in ("full", "cut"))
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    assert [r["loss"] for r in read_metrics(tmp_path / "full")] == [r["loss"] for r in read_metrics(tmp_path / "cut")]


def test_step_callbacks_keep_extra_resume_state_and_can_stop_the_run(ds, tmp_path):
    """The loop's hook point: callbacks run after every optimizer step, may keep resume state in
    TrainState.extra (as a best-so-far metric would) and may ask for a checkpoint-and-stop (a lost lease)."""
    torch.set_num_threads(1)

    def count(run, out):
        run.state.extra["steps_seen"] = run.state.extra.get("steps_seen", 0) + 1
        run.state.extra["best_loss"] = min(run.state.extra.get("best_loss", math.inf), out["loss"])

    def stop_at_3(run, out):
        if run.state.step == 3:
            run.request_stop("lease lost")

    cfg = small_cfg(samples_per_epoch=96, ckpt_every=1000)
    with pytest.raises(T.Preempted, match="lease lost"):
        T.train(cfg, ds, str(tmp_path / "run"), resume=None, callbacks=[count, stop_at_3])
    saved = load_state(str(tmp_path / "run" / "checkpoints" / "step_00000003.pt"))["train_state"]
    assert saved["step"] == 3 and saved["extra"]["steps_seen"] == 3
    T.train(cfg, ds, str(tmp_path / "run"), callbacks=[count])
    T.train(cfg, ds, str(tmp_path / "ref"), resume=None, callbacks=[count])
    a, b = (load_state(str(tmp_path / d / "checkpoint.pt"))["train_state"]["extra"] for d in ("run", "ref"))
    assert a == b and a["steps_seen"] == 6


# ------------------------------------------------------------------------------------------- DDP
def test_two_process_gloo_ddp(ds, tmp_path):
    cfg = small_cfg(samples_per_epoch=192, batch_size=8, num_workers=1, ckpt_every=4, record_samples=True)
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfgmod.to_dict(cfg), f)
    out = str(tmp_path / "ddp")
    proc = _launch(cfg_path, ds, out, nproc=2)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert final["world_size"] == 2 and final["global_batch"] == 16 and final["steps"] == 12
    ts = load_state(os.path.join(out, "checkpoints", "step_00000012.pt"))["train_state"]
    assert set(ts["rng"]) == {"0", "1"} and ts["world_size"] == 2
    # one rank-independent data position: 8 streams (4 per rank), 16 // 8 = 2 samples of each per step
    assert ts["loader"]["streams"] == 8 and set(ts["loader"]["positions"]) == {str(s) for s in range(8)}
    assert ts["loader"]["steps_done"] == 12 and ts["loader"]["global_batch"] == 16
    assert not torch.equal(ts["rng"]["0"]["torch"], ts["rng"]["1"]["torch"])  # seed + rank
    # the two ranks train on different samples, and a full pass uses no sample twice in the epoch
    steps = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    keys = [k for s in steps for k in s["keys"]]
    assert [s["step"] for s in steps] == list(range(1, 13)) and all(len(s["keys"]) == 16 for s in steps)
    assert len(keys) == len(set(keys)) == 192
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in recs)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt")).config.kind == "slip"


def test_bf16_autocast_grad_checkpointing_and_accumulation_run(ds, tmp_path):
    torch.set_num_threads(1)
    cfg = small_cfg(precision="bf16", grad_checkpointing=True, accum_steps=2, batch_size=8, samples_per_epoch=64)
    final = T.train(cfg, ds, str(tmp_path), resume=None)
    assert final["steps"] == 4 and final["global_batch"] == 16 and math.isfinite(final["loss"])


def test_launch_templates_are_valid():
    import yaml

    from slip_core.launch import torchrun_command

    infra = os.path.join(REPO, "infra")
    for name in ("torchrun_multinode.sh", "slurm_train.sbatch"):
        path = os.path.join(infra, name)
        subprocess.run(["bash", "-n", path], check=True)  # syntax
        assert "-m evaluation.train_entry" in open(path).read()  # the trainer with in-training evaluation
    # SLURM's warning goes to the job step's tasks (the trainer ranks), not only to the batch shell ("B:")
    sbatch = open(os.path.join(infra, "slurm_train.sbatch")).read()
    assert "#SBATCH --signal=USR1@120" in sbatch and "B:USR1" not in sbatch and "exec " in sbatch
    assert "scontrol requeue" in sbatch and '"$rc" -eq 143' in sbatch
    for name in ("k8s_pytorchjob.yaml", "k8s_indexed_job.yaml"):
        docs = [d for d in yaml.safe_load_all(open(os.path.join(infra, name))) if d]
        assert docs and all("kind" in d and "spec" in d for d in docs)
    multi = torchrun_command("M", "OUT", "c.json", nproc=8, nnodes=4, rdzv_endpoint="h:29400")
    assert "--nnodes=4" in multi and "--rdzv_endpoint=h:29400" in multi and "--standalone" not in multi
    assert torchrun_command("M", "OUT", "c.json")[3:5] == ["--nproc_per_node=1", "--standalone"]


def test_trains_and_resumes_on_object_store(ds, tmp_path, capsys):
    """Shards read and checkpoints/metrics written through fsspec on a real S3 API (moto server)."""
    from slip_core import artifacts, storage
    from tests._s3_util import s3_server

    torch.set_num_threads(1)
    with s3_server() as bucket:
        fs, _ = storage.url_to_fs(bucket)
        fs.put(artifacts.artifact_root(ds) + "/", f"{bucket}/ds/", recursive=True)
        s3_ds, out = f"{bucket}/ds/manifest.json", f"{bucket}/run"
        cfg = small_cfg(samples_per_epoch=96, ckpt_every=2, keep_checkpoints=1)
        T.train(T.TrainConfig(**{**cfgmod.to_dict(cfg), "max_steps": 4, "betas": tuple(cfg.betas)}), s3_ds, out)
        assert storage.read_text(f"{out}/checkpoints/latest") == "step_00000004.pt"
        capsys.readouterr()
        final = T.train(cfg, s3_ds, out)  # resume="latest" from the bucket
        assert final["steps"] == 6 and "step_00000004.pt at step 4" in capsys.readouterr().out
        steps = [json.loads(line)["step"] for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/checkpoints", detail=False))
        assert names == ["latest", "step_00000006.pt"]
        assert load_state(f"{out}/checkpoint.pt")["train_state"]["step"] == 6


def _write_cfg(cfg: T.TrainConfig, path) -> str:
    with open(path, "w") as f:
        json.dump(cfgmod.to_dict(cfg), f)
    return str(path)


def _params(path: str) -> dict:
    return load_state(path)["state_dict"]


def _wait_for_step(out: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}"
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and len(read_metrics(out)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def signal_reference(ds, tmp_path_factory):
    """An uninterrupted run of the config the signal tests interrupt (same launcher)."""
    root = tmp_path_factory.mktemp("signal_ref")
    cfg_path = _write_cfg(small_cfg(samples_per_epoch=320, num_workers=1, ckpt_every=1000), root / "cfg.json")
    proc = _launch(cfg_path, ds, str(root / "ref"))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    return cfg_path, str(root / "ref")


@pytest.mark.parametrize("how", ["SIGUSR1 to the trainer (SLURM --signal=USR1@120)",
                                 "SIGTERM to the process group (torchrun / launch.py)"])
def test_stop_signal_checkpoints_exits_143_and_resumes_bit_identically(ds, tmp_path, signal_reference, how,
                                                                        fault_log):
    cfg_path, ref_dir = signal_reference
    out = str(tmp_path / "run")
    proc = _launch(cfg_path, ds, out)
    _wait_for_step(out, 3, proc)
    if how.startswith("SIGUSR1"):  # slurmstepd signals the task's processes; loader workers ignore it
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, log
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        step = int(f.read().strip()[5:13])
    sig = how.split()[0]
    assert step >= 3 and f"stop requested (signal {sig})" in log  # no ckpt_every boundary before step 20
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    done = _launch(cfg_path, ds, out)
    log, _ = done.communicate(timeout=300)
    assert done.returncode == 0 and f"at step {step}" in log, log
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 21))
    a, b = _params(os.path.join(ref_dir, "checkpoint.pt")), _params(os.path.join(out, "checkpoint.pt"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ref_dir)]
    fault_log.record("kill", "train", f"{how} mid-epoch (preemption)",
                     f"checkpoint written at the current step boundary (step {step}), exit 143; rerun resumed "
                     "there, finished steps 1..20 with no gap or duplicate, parameters and losses bit-identical "
                     "to an uninterrupted run", bound="< 300 s")


# ------------------------------------------------------------------------------------------- elastic
@pytest.fixture(scope="module")
def elastic_reference(ds, tmp_path_factory):
    """Global batch 16 (8 per device), 2 epochs × 6 steps, every step's sample keys recorded; one process."""
    root = tmp_path_factory.mktemp("elastic")
    cfg = small_cfg(epochs=2, samples_per_epoch=96, batch_size=8, global_batch=16, num_workers=1, ckpt_every=1000,
                    record_samples=True)
    torch.set_num_threads(1)
    final = T.train(cfg, ds, str(root / "ref"), resume=None)
    return cfg, root, str(root / "ref"), final


def _steps(out: str) -> list[dict]:
    with open(os.path.join(out, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_keeps_global_batch_and_data_position(ds, elastic_reference, before, after, tmp_path,
                                                             fault_log):
    cfg, root, ref_dir, ref_final = elastic_reference
    cfg_path = _write_cfg(cfg, tmp_path / "cfg.json")
    out = str(tmp_path / "run")
    cut = T.TrainConfig(**{**cfgmod.to_dict(cfg), "betas": tuple(cfg.betas), "max_steps": 4})
    first = _launch(_write_cfg(cut, tmp_path / "cut.json"), ds, out, nproc=before)
    log1, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log1
    second = _launch(cfg_path, ds, out, nproc=after)
    log2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log2
    assert f"written at world size {before}: elastic resume" in log2 and "at step 4" in log2, log2
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert (final["world_size"], final["global_batch"], final["steps"]) == (after, 16, 12)
    assert (final["micro_batch"], final["accum_steps"]) == ((8, 2) if after == 1 else (8, 1))
    # every step trained on exactly the samples of the uninterrupted run, in the same order: none skipped,
    # none repeated within an epoch, across the change of world size and of accumulation
    got, want = _steps(out), _steps(ref_dir)
    assert [s["step"] for s in got] == list(range(1, 13)) and [s["keys"] for s in got] == [s["keys"] for s in want]
    for epoch in range(2):
        keys = [k for s in got[epoch * 6:(epoch + 1) * 6] for k in s["keys"]]
        assert len(keys) == len(set(keys)) == 96
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13)) and math.isfinite(final["loss"])
    fault_log.record("kill", "train", f"job stopped at world size {before} (step 4 of 12, mid-epoch), resumed at "
                     f"world size {after}", f"global batch 16 kept ({final['micro_batch']} per micro-batch × {after} "
                     f"ranks × {final['accum_steps']}), every step's samples equal to an uninterrupted run's, none "
                     "skipped or repeated within an epoch", bound="< 300 s")


def test_batch_plan_arithmetic():
    # 56 GPUs cannot split 4096: the nearest global batch whose micro-batches stay >= half the budget
    p = plan_batch(4096, world=56, max_micro=64, num_workers=10)
    assert (p.global_batch, p.micro, p.accum) == (4144, 37, 2) and "4096 requested" in p.describe()
    assert p.streams % 56 == 0 and p.global_batch % p.streams == 0 and p.workers >= 1
    assert plan_batch(16, world=1, max_micro=8).accum == 2  # fewer devices: accumulation keeps the batch
    resumed = plan_batch(16, world=4, max_micro=8, streams=8, exact=True)
    assert (resumed.micro, resumed.accum, resumed.streams) == (4, 1, 8)
    with pytest.raises(T.PlanError, match="resume at world size 1, 2, 4, 8"):
        plan_batch(16, world=3, max_micro=8, streams=8, exact=True)  # 8 streams do not split over 3 ranks
    with pytest.raises(T.PlanError, match="must be a multiple of the world size 2"):
        plan_batch(16, world=2, max_micro=8, streams=3)
