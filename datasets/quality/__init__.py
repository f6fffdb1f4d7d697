"""The dataset quality pass (issue 10): per-image fingerprints, caption/image/CLIP-score filters, eval-set
decontamination and dedup, applied to a download ledger when a dataset is published.

    fingerprint.py     pHash + byte hashes per image, cached per img2dataset shard
    hash_engines.py    where the per-shard hashing runs: processes | dask://host:port | spark
    filters.py         caption / image-size / CLIP-score rules
    decontaminate.py   eval-set overlap (the eval catalog's test splits)
    dedup.py           exact + near-duplicate collapse, stable across versions
    config.py          QualityConfig and presets
    apply.py           the pass itself, columnar (rule_table per shard, decide; run_quality, apply_quality_report, audit)
"""
from datasets.quality.apply import (REPORT_FILE, RULE_SCHEMA, apply_quality, apply_quality_report, audit,
                                    clip_score_table, clip_scores_for_ledger, decide, ledger_samples, load_previous,
                                    rule_table, run_quality, summary)
from datasets.quality.config import QUALITY_PRESETS, QualityConfig, make_quality_config

__all__ = ["QUALITY_PRESETS", "REPORT_FILE", "RULE_SCHEMA", "QualityConfig", "apply_quality", "apply_quality_report",
           "audit", "clip_score_table", "clip_scores_for_ledger", "decide", "ledger_samples", "load_previous",
           "make_quality_config", "rule_table", "run_quality", "summary"]
