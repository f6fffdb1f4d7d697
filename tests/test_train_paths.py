"""Training paths beyond eager fp32, each run for real on CPU and compared with eager fp32 at a stated tolerance:
torch.compile (inductor), fp16 autocast + GradScaler, and gradient accumulation (where the math says it is
equivalent, and shown not to be where it is not)."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time

import pytest
import torch
import torch.nn as nn

from slip_core import trainer as T
from slip_core.checkpoint import load_state
from slip_core.optim import build_optimizer
from slip_core.registry import build_model, get_spec
from slip_core.tokenizer import tokenize
from tests._train_util import fashion_samples, write_dataset

torch.set_num_threads(1)
SMALL = {"image_size": 32, "vision_depth": 1, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32,
         "context_length": 16}
CPU = torch.device("cpu")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("paths")), fashion_samples(96, seed=8), per_shard=24)


def _cfg(model="CLIP_VIT_TINY", **kw) -> T.TrainConfig:
    base = dict(model=model, model_overrides=SMALL, epochs=1, samples_per_epoch=96, batch_size=8, lr=1e-3,
                weight_decay=0.1, warmup_epochs=0.0, start_lr=1e-3, num_workers=0, log_every=1, ckpt_every=1000,
                shuffle_chunk=24, threads=1)
    return T.TrainConfig(**{**base, **kw})


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _batch(n: int = 8, seed: int = 0, dtype=torch.uint8) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = {k: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8) for k in ("image", "aug1", "aug2")}
    if dtype != torch.uint8:  # fp64 exactness tests: normalised float views
        views = {k: (v.to(dtype) - 128) / 64 for k, v in views.items()}
    return {**views, "text": tokenize([f"a photo of thing {i}" for i in range(n)], SMALL["context_length"])}


# ------------------------------------------------------------------------------------------- torch.compile
def test_compile_inductor_cpu_matches_eager(ds, tmp_path):
    """Inductor on CPU (g++ C++ kernels). Tolerance: per-step losses within 1e-4 relative (measured ~2e-6),
    first-step gradients within 1e-3 of their norm; AdamW turns tiny gradient differences of near-zero
    entries into up to lr-sized parameter differences, so parameters are compared through the losses."""
    torch.manual_seed(0)
    eager = build_model("CLIP_VIT_TINY", **SMALL)
    compiled_model = copy.deepcopy(eager)
    spec, batch = get_spec(eager.config), _batch()
    grads, seconds = [], []
    for m, fwd in ((eager, eager), (compiled_model, torch.compile(compiled_model))):
        t0 = time.perf_counter()
        spec.loss()(fwd(*T.forward_inputs(spec, batch, CPU)))["loss"].backward()
        seconds.append(time.perf_counter() - t0)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-3

    T.train(_cfg(max_steps=4), ds, str(tmp_path / "eager"), resume=None)
    T.train(_cfg(max_steps=4, compile=True), ds, str(tmp_path / "compiled"), resume=None)
    a, b = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["loss"], y["loss"])
    steady = lambda recs: sum(r["step_time"] for r in recs[1:]) / (len(recs) - 1)  # noqa: E731
    print(f"\ncompile (inductor, CPU): first forward+backward {seconds[1]:.1f} s (compilation; eager "
          f"{seconds[0]:.2f} s), in the trainer "
          f"{steady(b):.3f} s/step vs eager {steady(a):.3f} s/step; max loss rel diff "
          f"{max(abs(x['loss'] - y['loss']) / x['loss'] for x, y in zip(a, b)):.1e}")


# ------------------------------------------------------------------------------------------- fp16 + GradScaler
def _run_steps(precision: str, steps: int) -> tuple[list[float], list[bool]]:
    torch.manual_seed(0)
    model = build_model("SLIP_VIT_TINY", **SMALL)
    spec, batch = get_spec(model.config), _batch(seed=3)
    opt = build_optimizer(model, 1e-3, 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if precision == "fp16" else contextlib.nullcontext
    losses, skipped = [], []
    for _ in range(steps):
        before = scaler.get_scale() if scaler.is_enabled() else 0.0
        losses.append(T.train_step(model, spec.loss(), opt, scaler, [batch], spec=spec, device=CPU,
                                   autocast=autocast, lr=1e-3)["loss"])
        skipped.append(scaler.is_enabled() and scaler.get_scale() < before)
    return losses, skipped


def test_fp16_grad_scaler_matches_fp32():
    """GradScaler starts at 2^16: the first steps overflow in fp16, are skipped (scale halved, parameters
    untouched), then training follows the fp32 run shifted by the skipped steps. Tolerance: the loss of the
    untouched parameters within 1e-3 relative (fp16 activations only; measured 1e-4), the next 6 steps of the
    trajectory within 3 % (measured up to 1.9 %: small differences grow as the loss falls fast)."""
    steps = 10
    fp32, _ = _run_steps("fp32", steps)
    fp16, skipped = _run_steps("fp16", steps)
    k = skipped.index(False)  # leading overflow steps
    assert 1 <= k <= 4 and not any(skipped[k:]), skipped
    first = max(abs(fp16[i] - fp32[0]) / fp32[0] for i in range(k + 1))  # the skipped steps changed nothing
    trajectory = max(abs(fp16[k + j] - fp32[j]) / fp32[j] for j in range(steps - k))
    print(f"\nfp16 + GradScaler: {k} overflow steps skipped; loss rel diff vs fp32 {first:.1e} before any update, "
          f"<= {trajectory:.1e} over the next {steps - k - 1} steps")
    assert first < 1e-3 and trajectory < 3e-2


def test_fp16_trainer_resume_restores_the_scaler(ds, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    T.train(_cfg("SLIP_VIT_TINY", precision="fp16", max_steps=8), ds, full, resume=None)
    T.train(_cfg("SLIP_VIT_TINY", precision="fp16", max_steps=5), ds, cut, resume=None)
    scale = load_state(os.path.join(cut, "checkpoint.pt"))["train_state"]["scaler"]["scale"]
    assert scale < 65536.0  # the scaler moved, and its state is in the checkpoint
    T.train(_cfg("SLIP_VIT_TINY", precision="fp16", max_steps=8), ds, cut)  # resumes at step 5
    a, b = load_state(os.path.join(full, "checkpoint.pt")), load_state(os.path.join(cut, "checkpoint.pt"))
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    assert a["train_state"]["scaler"] == b["train_state"]["scaler"]


# ------------------------------------------------------------------------------------------- accumulation
class SeparableLoss(nn.Module):
    """A per-sample-separable objective (mean over rows): ‖aug1 − aug2‖² through the SSL head when the model has
    one, else ‖image − text‖²."""

    def forward(self, out: dict) -> dict:
        a, b = (out["aug1_embed"], out["aug2_embed"]) if "aug1_embed" in out else (out["image_embed"], out["text_embed"])
        return {"loss": (a - b).pow(2).sum(-1).mean()}


def _update(model, loss_fn, micro: list[dict], lr: float = 1e-3) -> torch.Tensor:
    """The step's (accumulated) gradient, read off one train_step with plain SGD: (before − after) / lr."""
    model = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    T.train_step(model, loss_fn, opt, torch.amp.GradScaler("cpu", enabled=False), micro, spec=get_spec(model.config),
                 device=CPU, autocast=contextlib.nullcontext, lr=lr)
    return (before - torch.cat([p.detach().flatten() for p in model.parameters()])) / lr


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["CLIP_VIT_TINY", "SLIP_VIT_TINY"])
def test_gradient_accumulation_equivalences(name):
    """fp64, k = 2 micro-batches of 4 vs one batch of 8, through trainer.train_step (SGD, so the update is
    the gradient; the logit-scale clamp does not bind at lr 1e-3).

    Equivalent, and equal to ~1e-12: accumulation == one pass over the 8 samples whose loss is the MEAN OF THE
    PER-MICRO-BATCH LOSSES (InfoNCE / NT-Xent normalised within each micro-batch, the SimCLR head's BatchNorm
    with micro-batch statistics) — for every kind. Not equivalent: the contrastive loss over all 8 (each row
    then has 7 negatives, not 3), which differs by far more than rounding. A per-sample-separable objective is
    equivalent to the full batch exactly when the forward is: CLIP's towers (LayerNorm only) yes, SLIP's
    BatchNorm head no."""
    torch.manual_seed(0)
    model = build_model(name, **SMALL).double().train()
    loss_fn = get_spec(model.config).loss()
    full = _batch(8, seed=5, dtype=torch.float64)
    micro = [{k: v[i * 4:(i + 1) * 4] for k, v in full.items()} for i in range(2)]
    accumulated = _update(model, loss_fn, micro)

    graph = copy.deepcopy(model)
    inputs = lambda b: T.forward_inputs(get_spec(graph.config), b, CPU)  # noqa: E731
    mean_of_micro = sum(loss_fn(graph(*inputs(b)))["loss"] for b in micro) / 2
    mean_of_micro.backward()
    by_hand = torch.cat([p.grad.flatten() for p in graph.parameters()])
    equal_gap, full_gap = _rel(accumulated, by_hand), _rel(accumulated, _update(model, loss_fn, [full]))
    separable_gap = _rel(_update(model, SeparableLoss(), micro), _update(model, SeparableLoss(), [full]))
    print(f"\n{name} accumulation 2x4 vs: mean of micro-batch losses {equal_gap:.1e}, full-batch contrastive loss "
          f"{full_gap:.1e}, separable objective on the full batch {separable_gap:.1e} (relative gradient difference)")
    assert equal_gap < 1e-9
    assert full_gap > 1e-3  # the contrastive loss does not separate
    if name.startswith("CLIP"):
        assert separable_gap < 1e-9
    else:
        assert separable_gap > 1e-6  # BatchNorm statistics of the SSL head are per micro-batch
