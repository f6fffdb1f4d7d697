"""Reproduce presets: which dataset / train / eval preset each `slip reproduce --preset NAME` chains.

Kept apart from flows/reproduce.py so that `slip status` and a no-op check read them without importing
Prefect or any stage (the paper presets are derived from TRAIN_PRESETS, imported only when asked for).
"""
from __future__ import annotations

from dataclasses import dataclass

from slip_core.config import ConfigError


@dataclass(frozen=True)
class ReproducePreset:
    dataset: str  # datasets.config.DATASET_PRESETS key
    train: str  # slip_core.trainer.TRAIN_PRESETS key
    eval: str  # EVAL_PRESETS key
    demo_corpus: bool = False  # build the embedded demo corpus and serve it on 127.0.0.1
    dataset_rows: int = 0  # expected input rows (dry-run estimate when no dataset is built yet)
    # Baselines trained on the same dataset artifact with the same schedule (equal steps) and evaluated the
    # same way, for the paper's Table 2 comparison: (label, TRAIN_PRESETS key). Stages `train-LABEL`, `eval-LABEL`.
    baselines: tuple[tuple[str, str], ...] = ()


# Input rows per paper dataset: YFCC15M as SLIP logged it (SPEC §1); CC3M / CC12M as published.
PAPER_ROWS = {"yfcc15m": 14_689_580, "cc3m": 3_318_333, "cc12m": 12_423_374}
DEMO_PRESETS = {"tiny": ReproducePreset(dataset="tiny", train="tiny", eval="tiny", demo_corpus=True, dataset_rows=3000,
                                        baselines=(("clip", "clip_tiny"),))}
# `slip study`: the methods of Table 2 per reproduce preset, (label, TRAIN_PRESETS key); the first is the method
# whose measured wall time the `<first baseline>@walltime` arm is given.
STUDY_METHODS = {"tiny": (("slip", "tiny"), ("clip", "clip_tiny"), ("simclr", "simclr_tiny"))}


def reproduce_presets() -> dict[str, ReproducePreset]:
    """Every preset: the demo, and one per paper training preset named `<kind>_<vit>_<data>_<N>ep` (reading
    TRAIN_PRESETS imports the model registry, i.e. torch: only done when a paper preset is asked for)."""
    from slip_core.train_config import TRAIN_PRESETS

    out = dict(DEMO_PRESETS)
    for name in TRAIN_PRESETS:
        parts = name.split("_")
        if len(parts) == 4 and parts[2] in PAPER_ROWS and parts[3].endswith("ep"):
            out[name] = ReproducePreset(dataset=parts[2], train=name, eval="paper", dataset_rows=PAPER_ROWS[parts[2]])
    return out


def reproduce_preset(name: str) -> ReproducePreset:
    if name in DEMO_PRESETS:
        return DEMO_PRESETS[name]
    presets = reproduce_presets()
    if name not in presets:
        raise ConfigError(f"unknown reproduce preset {name!r}; choose from {sorted(presets)}")
    return presets[name]
