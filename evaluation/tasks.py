"""The eval config and the one entry point per (task, dataset): `run_task` -> a flat result record.

Record schema (results.json is a list of these): dataset, task, model, checkpoint_sha256, metric, value,
chance, num_samples, dataset_sha256, plus task-specific scalars (top1, top5, best_C, lr, R@k, ...) and
`note` where our recipe deviates from the reference.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from evaluation import common, linear_probe, retrieval, zeroshot
from slip_core.features import cache_key

TASKS = ("zeroshot", "linear", "finetune", "retrieval")


@dataclass
class EvalConfig:
    zeroshot: list[str] = field(default_factory=list)  # datasets per task (datasets.catalog names)
    linear: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    retrieval: list[str] = field(default_factory=list)  # captioned sets ("photos" or <root>/<name>/captions.jsonl)
    linear_recipe: str = "fast"  # "fast" (cached features + logistic regression) | "reference" (MoCo v3 SGD)
    data_root: str | None = None
    max_samples: int | None = None  # test images per dataset (reproducible subsample); None = all
    max_train_samples: int | None = None  # train images for the probes
    batch_size: int = 256
    num_workers: int = 0
    fast_probe: linear_probe.FastProbeConfig = field(default_factory=linear_probe.FastProbeConfig)
    reference_probe: linear_probe.ReferenceProbeConfig = field(default_factory=linear_probe.ReferenceProbeConfig)
    finetune_preset: str | None = None  # None: by the model's ViT size (finetune.FINETUNE_PRESETS)
    finetune_overrides: dict = field(default_factory=dict)
    finetune_nproc: int = 1
    finetune_timeout_s: float | None = None
    seed: int = 0

    def jobs(self) -> list[tuple[str, str]]:
        return [(t, d) for t in TASKS for d in getattr(self, t)]


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_task(task: str, lm: common.LoadedModel, dataset: str, cfg: EvalConfig, dataset_sha256: str = "",
             cache_dir: str | None = None, log=print) -> dict:
    """Evaluate one (task, dataset) and return its flat record."""
    from datasets import catalog

    base = {"dataset": dataset, "task": task, "model": lm.name, "checkpoint_sha256": lm.sha256,
            "dataset_sha256": dataset_sha256}
    size = lm.model.config.image_size
    if task == "retrieval":
        return {**base, **_scalars(retrieval.evaluate(lm, dataset, cfg.data_root))}
    catalog.ensure(dataset, cfg.data_root)
    if task == "zeroshot":
        test = catalog.load(dataset, "test", common.zeroshot_transform(size), cfg.data_root, cfg.max_samples, cfg.seed)
        res = zeroshot.evaluate(lm, test, cfg.batch_size, cfg.num_workers, cache_dir, dataset_sha256)
        return {**base, **_scalars(res), "data_format": test.format}
    if task == "linear":
        test = catalog.load(dataset, "test", common.probe_eval_transform(size), cfg.data_root, cfg.max_samples, cfg.seed)
        if cfg.linear_recipe == "fast":
            train = catalog.load(dataset, "train", common.probe_eval_transform(size), cfg.data_root,
                                 cfg.max_train_samples, cfg.seed)
            res = linear_probe.fast_probe(lm, train, test, cfg.fast_probe, cfg.batch_size, cfg.num_workers,
                                          cache_dir, dataset_sha256)
        elif cfg.linear_recipe == "reference":
            train = catalog.load(dataset, "train", linear_probe.RandomResizedCropFlip(size, cfg.seed), cfg.data_root,
                                 cfg.max_train_samples, cfg.seed)
            res = linear_probe.reference_probe(lm, train, test, cfg.reference_probe, log=log)
            res["note"] = "intended lr = 0.1 x batch/256 (SPEC §9.6); head sized to the dataset's classes"
        else:
            raise ValueError(f"unknown linear_recipe {cfg.linear_recipe!r}")
        return {**base, **_scalars(res), "data_format": test.format}
    if task == "finetune":
        from slip_core import config as cfg_util
        from evaluation import finetune

        preset = cfg.finetune_preset or finetune.preset_for(lm.name)
        ft = dataclasses.replace(finetune.FINETUNE_PRESETS[preset], dataset=dataset, data_root=cfg.data_root,
                                 seed=cfg.seed)
        ft = cfg_util.from_dict(finetune.FinetuneConfig, {**cfg_util.to_dict(ft), **cfg.finetune_overrides})
        out_dir = os.path.join(common.cache_root(cache_dir), "finetune",
                               cache_key(ckpt=lm.sha256, data=dataset_sha256, cfg=cfg_util.to_dict(ft)))
        res = finetune.launch(lm.path, out_dir, ft, nproc=cfg.finetune_nproc, timeout_s=cfg.finetune_timeout_s,
                              log=log)
        return {**base, **_scalars(res), "finetune_preset": preset, "finetune_dir": out_dir}
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")

