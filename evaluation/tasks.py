"""The eval config and the one entry point per (task, dataset): `run_task` -> a flat result record.

Record schema (results.json is a list of these): dataset, task, model, checkpoint_sha256, metric, value,
chance, num_samples, dataset_sha256, plus task-specific scalars (top1, top5, best_C, lr, R@k, ...) and
`note` where our recipe deviates from the reference.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from evaluation import common, linear_probe, retrieval, zeroshot
from slip_core.distributed import DEVICE_PATTERN, get_world_size, local_device
from slip_core.features import cache_key, precision

TASKS = ("zeroshot", "linear", "finetune", "retrieval")


@dataclass
class EvalConfig:
    zeroshot: list[str] = field(default_factory=list)  # datasets per task (datasets.catalog names)
    linear: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    retrieval: list[str] = field(default_factory=list)  # captioned sets ("photos" or <root>/<name>/captions.jsonl)
    linear_recipe: str = "fast"  # "fast" (cached features + logistic regression) | "reference" (MoCo v3 SGD)
    data_root: str | None = None
    reference_prompts: str | None = None  # a folder with SLIP's templates.json, labels.json[, dataset_catalog.json]
    max_samples: int | None = None  # test images per dataset (reproducible subsample); None = all
    max_train_samples: int | None = None  # train images for the probes
    batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes per rank (pinned memory on CUDA)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N; features in bf16 on CUDA, fp32 on CPU
    fast_probe: linear_probe.FastProbeConfig = field(default_factory=linear_probe.FastProbeConfig)
    reference_probe: linear_probe.ReferenceProbeConfig = field(default_factory=linear_probe.ReferenceProbeConfig)
    finetune_preset: str | None = None  # None: by the model's ViT size (finetune.FINETUNE_PRESETS)
    finetune_overrides: dict = field(default_factory=dict)
    finetune_nproc: int = 1
    finetune_timeout_s: float | None = None
    # where the fine-tune's ranks run (slip_core/launchers.py: {"kind": "slurm", ...}); not in the identity
    finetune_launcher: dict = field(default_factory=dict)
    seed: int = 0
    which: str = "final"  # a checkpoint artifact's final checkpoint or its best in-training one (common.WHICH)

    def __post_init__(self):
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.which not in common.WHICH:
            raise ValueError(f"which {self.which!r}: use {' or '.join(common.WHICH)}")

    def identity_settings(self) -> dict:
        """The config as the stage identity sees it: the fine-tune's world size, not where its ranks run."""
        from slip_core import launchers
        from slip_core.config import to_dict

        d = to_dict(self)
        launcher = d.pop("finetune_launcher") or None
        d["finetune_nproc"] = launchers.world_size(launcher, self.finetune_nproc)
        return d

    def jobs(self) -> list[tuple[str, str]]:
        return [(t, d) for t in TASKS for d in getattr(self, t)]


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _ran_on(device) -> dict:
    return {"device": device.type, "precision": precision(device), "world_size": get_world_size()}


def _zeroshot(lm, dataset, cfg, dataset_sha256, cache_dir, device, log) -> dict | None:
    from datasets import catalog, prompts

    test = catalog.load(dataset, "test", common.zeroshot_transform(lm.model.config.image_size), cfg.data_root,
                        cfg.max_samples, cfg.seed, prompts.load_reference(cfg.reference_prompts))
    res = zeroshot.evaluate(lm, test, cfg.batch_size, cfg.num_workers, cache_dir, dataset_sha256, device)
    if res is None:
        return None
    chosen = test.prompt_set
    return {**_scalars(res), "data_format": test.format, "prompt_source": chosen.source,
            "classnames_source": chosen.classnames_source, "templates_source": chosen.templates_source,
            **_ran_on(device)}


def _linear(lm, dataset, cfg, dataset_sha256, cache_dir, device, log) -> dict | None:
    from datasets import catalog, prompts

    size, reference = lm.model.config.image_size, prompts.load_reference(cfg.reference_prompts)
    test = catalog.load(dataset, "test", common.probe_eval_transform(size), cfg.data_root, cfg.max_samples, cfg.seed,
                        reference)
    if cfg.linear_recipe == "fast":
        train = catalog.load(dataset, "train", common.probe_eval_transform(size), cfg.data_root,
                             cfg.max_train_samples, cfg.seed, reference)
        res = linear_probe.fast_probe(lm, train, test, cfg.fast_probe, cfg.batch_size, cfg.num_workers,
                                      cache_dir, dataset_sha256, device)
    elif cfg.linear_recipe == "reference":
        if get_world_size() > 1:
            raise ValueError("linear_recipe=reference trains its head in one process: run it without torchrun")
        train = catalog.load(dataset, "train", linear_probe.RandomResizedCropFlip(size, cfg.seed), cfg.data_root,
                             cfg.max_train_samples, cfg.seed, reference)
        res = linear_probe.reference_probe(lm, train, test, cfg.reference_probe, log=log, device=device)
        res["note"] = "intended lr = 0.1 x batch/256 (SPEC §9.6); head sized to the dataset's classes"
    else:
        raise ValueError(f"unknown linear_recipe {cfg.linear_recipe!r}")
    return None if res is None else {**_scalars(res), "data_format": test.format, **_ran_on(device)}


def _retrieval(lm, dataset, cfg, dataset_sha256, cache_dir, device, log) -> dict | None:
    res = retrieval.evaluate(lm, dataset, cfg.data_root, cfg.batch_size, cfg.num_workers, device)
    return None if res is None else {**_scalars(res), **_ran_on(device)}


def _finetune(lm, dataset, cfg, dataset_sha256, cache_dir, device, log) -> dict:
    from evaluation import finetune
    from slip_core import config as cfg_util

    preset = cfg.finetune_preset or finetune.preset_for(lm.name)
    ft = dataclasses.replace(finetune.FINETUNE_PRESETS[preset], dataset=dataset, data_root=cfg.data_root,
                             seed=cfg.seed)
    ft = cfg_util.from_dict(finetune.FinetuneConfig, {**cfg_util.to_dict(ft), **cfg.finetune_overrides})
    out_dir = os.path.join(common.cache_root(cache_dir), "finetune",
                           cache_key(ckpt=lm.sha256, data=dataset_sha256, cfg=cfg_util.to_dict(ft)))
    res = finetune.launch(lm.path, out_dir, ft, nproc=cfg.finetune_nproc, timeout_s=cfg.finetune_timeout_s, log=log,
                          launcher=cfg.finetune_launcher or None)
    return {**_scalars(res), "finetune_preset": preset, "finetune_dir": out_dir}


RUNNERS = {"zeroshot": _zeroshot, "linear": _linear, "finetune": _finetune, "retrieval": _retrieval}


def run_task(task: str, lm: common.LoadedModel, dataset: str, cfg: EvalConfig, dataset_sha256: str = "",
             cache_dir: str | None = None, log=print) -> dict | None:
    """Evaluate one (task, dataset) on `cfg.device` and return its flat record. Under torchrun zero-shot,
    fast linear-probe and retrieval features are extracted across ranks: rank 0 returns the record, the other
    ranks None."""
    from datasets import catalog, prompts

    if task not in RUNNERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    device = local_device(cfg.device)
    if task != "retrieval":
        catalog.ensure(dataset, cfg.data_root, prompts.load_reference(cfg.reference_prompts))
    res = RUNNERS[task](lm, dataset, cfg, dataset_sha256, cache_dir, device, log)
    if res is None:
        return None
    return {"dataset": dataset, "task": task, "model": lm.name, "checkpoint_sha256": lm.sha256,
            "dataset_sha256": dataset_sha256, **res}
