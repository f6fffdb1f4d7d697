"""Evaluation during pretraining (issue 20): zero-shot top-1 on a held-out set every `eval_every_*`, the
best checkpoint kept by it (the reference's eval_freq + checkpoint_best.pt, REFERENCE_NOTES §6.5).

A trainer step callback (slip_core.trainer: `train(..., callbacks=[InTrainingEval(cfg)])`), injected by the
`python -m evaluation.train_entry` entry the pretraining flow launches, so slip_core never imports this
package. It runs the eval stage's own code (evaluation.zeroshot / knn over slip_core.features.extract: bf16
autocast on CUDA, fp32 on CPU, every rank extracting a contiguous slice under torchrun, rank 0 scoring) on
the training device, on the bare model in eval mode, and leaves training untouched: every RNG (python,
numpy, torch, CUDA) is restored after it, so a run with evaluation on trains bit-identically to one with
it off, and the best-so-far (TrainState.extra["best"], via TrainRun.offer_best) resumes exactly.

Held-out set: `eval_dataset` (a datasets.catalog name), or with `auto` ImageNet when it is on disk, else the
first downloaded catalog set, else the first local one (materialised: the demo's is a Fashion-MNIST test subset), capped at
`eval_max_samples` images (a reproducible subsample). Models without a text tower (SimCLR) get k-NN top-1 on
the same set, with `eval_knn_train_samples` train images as the bank (evaluation/knn.py), named `knn_top1`.
Each evaluation writes one metrics.jsonl record {step, epoch, eval_metric, <metric>, eval_dataset,
eval_samples, eval_seconds, is_best} (also to TensorBoard / W&B under eval/).
"""
from __future__ import annotations

import sys
import time
from fractions import Fraction

import torch.distributed as dist

from datasets import catalog
from evaluation import common, knn, zeroshot
from slip_core.checkpoint import unwrap
from slip_core.launch import EVAL_METRIC
from slip_core.train_config import TrainConfig
from slip_core.train_state import rng_state, set_rng_state

AUTO = "auto"
PREFERRED = "imagenet"  # the reference's in-training set


def is_due(cfg: TrainConfig, step: int, steps_per_epoch: int, stop_step: int) -> bool:
    """Evaluate after optimizer step `step`? Every `eval_every_steps` steps when > 0, else at each step that
    crosses a multiple of `eval_every_epochs` epochs (1: the end of every epoch, the reference's eval_freq;
    0.5 over 89 steps/epoch: steps 45, 89, 134, 178), and at the run's last step (the final checkpoint is a
    candidate too). Never when both are 0."""
    if cfg.eval_every_steps > 0:
        return step % cfg.eval_every_steps == 0 or step == stop_step
    if cfg.eval_every_epochs > 0:
        period = Fraction(str(cfg.eval_every_epochs)) * steps_per_epoch  # exact: 0.1 epochs is 0.1 epochs
        return step // period > (step - 1) // period or step == stop_step
    return False


def auto_candidates() -> list[str]:
    """ImageNet, the other downloaded catalog sets in catalog order, then the local sets (catalog.LOCAL_DATASETS:
    Fashion-MNIST first, the demo corpus' own domain)."""
    local = set(catalog.LOCAL_DATASETS)
    return [PREFERRED] + [n for n in catalog.CATALOG if n != PREFERRED and n not in local] + catalog.LOCAL_DATASETS


def choose_dataset(name: str, data_root: str | None) -> str:
    """`name`, or for `auto` the first of auto_candidates() on disk (a local set is prepared when reached)."""
    candidates = [name] if name != AUTO else auto_candidates()
    reasons = []
    for cand in candidates:
        try:
            catalog.ensure(cand, data_root)
            catalog.locate(cand, "test", data_root)
            return cand
        except (catalog.DatasetMissing, OSError) as e:
            reasons.append(f"{cand}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise catalog.DatasetMissing("no held-out set for in-training evaluation (" + "; ".join(reasons[:3])
                                 + (" ..." if len(reasons) > 3 else "") + ")")


class InTrainingEval:
    """The step callback. Loads its held-out set at the first due step; a missing set turns it off with one
    line (training goes on: the best checkpoint is then simply not kept)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.test = self.bank = None
        self.off: str | None = None

    def __call__(self, run, out: dict) -> None:
        step = run.state.step
        if self.off or not is_due(self.cfg, step, run.steps_per_epoch, run.stop_step):
            return
        model = unwrap(run.fwd_model)
        if self.test is None and not self._load(model, run.main):
            return
        t0 = time.time()
        res = broadcast(self._evaluate(model, run.device))
        seconds = round(time.time() - t0, 3)
        metric = "zeroshot_top1" if hasattr(model, "encode_text") else "knn_top1"
        value = float(res["top1"])
        best = run.offer_best(metric, value, dataset=self.test.name)
        run.log_record({"step": step, "epoch": round(step / run.steps_per_epoch, 4), EVAL_METRIC: metric,
                        metric: value, "eval_dataset": self.test.name, "eval_samples": res["num_samples"],
                        "eval_seconds": seconds, "is_best": best}, group="eval",
                       line=f"eval: step {step}: {metric} {value:.2f}% on {self.test.name} "
                            f"({res['num_samples']} samples, {seconds:.1f} s){' · best so far' if best else ''}")

    def _load(self, model, main: bool) -> bool:
        cfg, root = self.cfg, self.cfg.eval_data_root or None
        try:
            name = choose_dataset(cfg.eval_dataset, root)
            transform = common.zeroshot_transform(model.config.image_size)
            self.test = catalog.load(name, "test", transform, root, cfg.eval_max_samples or None, cfg.seed)
            if not hasattr(model, "encode_text"):
                self.bank = catalog.load(name, "train", transform, root, cfg.eval_knn_train_samples or None, cfg.seed)
        except (catalog.DatasetMissing, OSError, ValueError) as e:
            self.off = str(e).splitlines()[0]
            if main:
                print(f"in-training evaluation off: {self.off}", file=sys.stderr, flush=True)
            return False
        return True

    def _evaluate(self, model, device) -> dict | None:
        """The eval stage's code on the bare model, in eval mode, with every RNG restored afterwards."""
        workers = self.cfg.num_workers if device.type == "cuda" else 0
        saved, was_training = rng_state(), model.training
        model.eval()
        try:
            if self.bank is not None:
                return knn.evaluate_model(model, self.bank, self.test, self.cfg.eval_batch_size, workers, device)
            return zeroshot.evaluate_model(model, self.test, self.cfg.eval_batch_size, workers, device)
        finally:
            model.train(was_training)
            set_rng_state(saved)


def broadcast(res: dict | None) -> dict:
    """Rank 0's record on every rank (each must offer the same value to the best-checkpoint rule)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [res]
        dist.broadcast_object_list(box, src=0)
        res = box[0]
    return res


def callbacks_for(cfg: TrainConfig) -> list:
    """The trainer's callback factory (evaluation/train_entry.py): [InTrainingEval] unless evaluation is off."""
    return [InTrainingEval(cfg)] if (cfg.eval_every_steps > 0 or cfg.eval_every_epochs > 0) else []

