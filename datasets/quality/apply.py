"""Dataset quality pass: filters, eval decontamination and dedup applied to a download ledger.

    fps = fingerprint.fingerprint_ledger(ledger)            # once per image, from the shards
    ledger, report = apply_quality_report(ledger, fps, cfg, previous)

Only `success` rows can change, and only to `filtered` with a reason; every other row and column is left
as is, so each input row still has exactly one status. Rules run in this order and the first failing one
gives the reason: undecodable image, caption rules, image size rules, CLIP score, eval overlap, and last
dedup — so the sample kept for a duplicate cluster is one that passed everything else.

The published ledger carries the fingerprints (`fingerprint.attach_to_ledger`), so the next version of the
dataset gets `previous` from it (`load_previous(manifest)`, or `QualityConfig.previous_dataset`).
"""
from __future__ import annotations

import collections
import json
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets.quality import decontaminate, dedup, fingerprint
from datasets.quality import filters as quality_filters
from datasets.quality.config import QualityConfig
from slip_core import artifacts, storage
from slip_core.config import to_dict

REPORT_FILE = "quality.json"  # the report, published next to ledger.parquet


def load_previous(dataset_manifest: str) -> pa.Table:
    """`previous` for apply_quality from a published dataset: its ledger.parquet, which carries the
    fingerprint columns (fingerprint.attach_to_ledger) when it was built with the quality pass."""
    url = storage.join(artifacts.artifact_root(dataset_manifest), "ledger.parquet")
    fs, p = storage.url_to_fs(url)
    with fs.open(p, "rb") as f:
        ledger = pq.read_table(f)
    return dedup.previous_table(ledger)


def run_quality(ledger: pa.Table, cfg: QualityConfig, hash_engine: str = "processes") -> tuple[pa.Table, pa.Table, dict]:
    """The whole pass for the dataset stage: fingerprints (cached per shard, hashed on `hash_engine`), CLIP
    scores if configured, the previous version if configured, apply_quality_report. Returns (ledger,
    fingerprints, report)."""
    fps = fingerprint.fingerprint_ledger(ledger, engine=hash_engine)
    scores = clip_scores_for_ledger(ledger, cfg.clip_score_checkpoint) if cfg.clip_score_checkpoint else None
    previous = load_previous(cfg.previous_dataset) if cfg.previous_dataset else None
    out, report = apply_quality_report(ledger, fps, cfg, previous, scores=scores)
    return out, fps, report


def publish_outputs(ledger: pa.Table, result: tuple[pa.Table, pa.Table, dict], root: str) -> pa.Table:
    """For the dataset stage after repacking: writes root/quality.json (the report) and returns the ledger
    with its fingerprint columns (fingerprint.attach_to_ledger), which the next version reads as `previous`."""
    _, fps, report = result
    storage.atomic_write_text(storage.join(root, REPORT_FILE), json.dumps(report, indent=1, sort_keys=True, default=str))
    return fingerprint.attach_to_ledger(ledger, fps)


def summary(report: dict) -> dict:
    """The few numbers of a report worth keeping in the dataset's stats.json."""
    return {k: report.get(k) for k in ("success_in", "success_out", "filtered", "by_reason")}


def audit(dataset_manifest: str, cfg: QualityConfig) -> dict:
    """What the quality pass would remove from an already published dataset (its shards are read; nothing
    is written): the report of apply_quality_report on the published ledger."""
    root = artifacts.artifact_root(dataset_manifest)
    fs, p = storage.url_to_fs(storage.join(root, "ledger.parquet"))
    with fs.open(p, "rb") as f:
        ledger = pq.read_table(f)
    shards = sorted({s for s, st in zip(ledger["shard"].to_pylist(), ledger["status"].to_pylist()) if st == "success"})
    fps = fingerprint.fingerprint_tars([storage.join(root, s) for s in shards])  # published keys = dataset keys
    scores = None
    if cfg.clip_score_checkpoint:
        samples = ((k, _image(s), s.get("txt", b"").decode("utf-8", "replace"))
                   for sh in shards for k, s in fingerprint.iter_tar_samples(storage.join(root, sh)))
        scores = dict(quality_filters.clip_scores(samples, cfg.clip_score_checkpoint))
    previous = load_previous(cfg.previous_dataset) if cfg.previous_dataset else None
    return apply_quality_report(ledger, fps, cfg, previous, scores=scores)[1]


def _image(sample: dict) -> bytes:
    return next((sample[e] for e in fingerprint.IMAGE_EXTS if e in sample), b"")


def clip_scores_for_ledger(ledger: pa.Table, checkpoint, batch_size: int = 64) -> dict[str, float]:
    """{key: CLIP score} of the ledger's success rows (reads the shards; pass to apply_quality(scores=))."""
    samples = ((k, _image(s), s["txt"].decode("utf-8", "replace") if "txt" in s else "")
               for k, s in fingerprint.iter_ledger_samples(ledger))
    return dict(quality_filters.clip_scores(samples, checkpoint, batch_size))


def apply_quality(ledger: pa.Table, fingerprints: pa.Table, cfg: QualityConfig, previous: pa.Table | None = None,
                  **kwargs) -> pa.Table:
    """The ledger with quality decisions applied (see apply_quality_report)."""
    return apply_quality_report(ledger, fingerprints, cfg, previous, **kwargs)[0]


def apply_quality_report(ledger: pa.Table, fingerprints: pa.Table, cfg: QualityConfig,
                         previous: pa.Table | None = None, eval_index: decontaminate.EvalIndex | None = None,
                         scores: dict[str, float] | None = None) -> tuple[pa.Table, dict]:
    """(ledger with success rows possibly turned `filtered` + reason, report dict).

    `fingerprints` must cover every success row (fingerprint.fingerprint_ledger). `eval_index` defaults to
    decontaminate.load_eval_index(cfg.decontaminate); `scores` ({key: CLIP score}) is required when
    cfg.clip_score_checkpoint is set (clip_scores_for_ledger computes it)."""
    keys, status = ledger["key"].to_pylist(), ledger["status"].to_pylist()
    success = [k for k, s in zip(keys, status) if s == "success"]
    fp = {r["key"]: r for r in fingerprints.to_pylist()}
    missing = [k for k in success if k not in fp]
    if missing:
        raise ValueError(f"{len(missing)} success rows have no fingerprint (first: {missing[:3]})")
    if cfg.clip_score_checkpoint and scores is None:
        raise ValueError("clip_score_checkpoint is set: compute scores with clip_scores_for_ledger() and pass scores=")

    reason: dict[str, str] = {}
    for k in success:
        r = fp[k]
        why = "undecodable_image" if r["error"] or r["phash"] is None else ""
        why = why or _caption_reason(r, cfg)
        why = why or quality_filters.image_reason(r["orig_width"], r["orig_height"], cfg.min_image_side, cfg.max_aspect_ratio)
        if not why and cfg.clip_score_checkpoint:
            why = quality_filters.score_reason(scores.get(k), cfg.min_clip_score)
        if why:
            reason[k] = why
    report: dict = {"config": to_dict(cfg)}

    alive = [k for k in success if k not in reason]
    if cfg.decontaminate:
        index = eval_index or decontaminate.load_eval_index(cfg.decontaminate, cfg.decontam_hamming)
        overlaps = decontaminate.find_overlaps(_subset(fingerprints, alive), index)
        for k, (ds, _, _) in overlaps.items():
            reason[k] = f"{decontaminate.OVERLAP_PREFIX}{ds}"
        report["decontamination"] = decontaminate.overlap_report(overlaps, index)
        alive = [k for k in alive if k not in reason]

    if cfg.exact_dedup or cfg.near_dup_hamming >= 0:
        res = dedup.find_duplicates(_subset(fingerprints, alive), cfg.near_dup_hamming if cfg.near_dup_hamming >= 0 else None,
                                    cfg.exact_dedup, previous, ledger["key"])
        dups = res.duplicates
        for k, target in zip(dups["key"].to_pylist(), dups["duplicate_of"].to_pylist()):
            reason[k] = f"{dedup.DUP_PREFIX}{target}"
        report["dedup"] = {"kept": len(res.kept), "duplicates": len(dups), "by_kind": dict(collections.Counter(dups["kind"].to_pylist())),
                           "max_distance": max(pc.max(dups["distance"]).as_py() or 0, 0) if len(dups) else 0}

    out_status, out_reason = list(status), ledger["reason"].to_pylist()
    for i, k in enumerate(keys):
        if status[i] == "success" and k in reason:
            out_status[i], out_reason[i] = "filtered", reason[k]
    new = ledger.set_column(ledger.schema.get_field_index("status"), ledger.schema.field("status"),
                            pa.array(out_status, ledger.schema.field("status").type))
    new = new.set_column(new.schema.get_field_index("reason"), new.schema.field("reason"),
                         pa.array(out_reason, new.schema.field("reason").type))
    kinds = collections.Counter(r if r.startswith(decontaminate.OVERLAP_PREFIX) else r.split(":")[0].split("<")[0].split(">")[0]
                                for r in reason.values())
    report.update({"success_in": len(success), "success_out": len(success) - len(reason), "filtered": len(reason),
                   "by_reason": dict(sorted(kinds.items())),
                   "clip_score_mean": _mean(scores.values()) if scores else None})
    return new, report


def _caption_reason(row: dict, cfg: QualityConfig) -> str:
    """A sample fails the caption rules only if its caption AND every alternative (YFCC title/description,
    one of which the loader picks) fail; the reason is the main caption's."""
    rules = (cfg.min_caption_words, cfg.max_caption_words, cfg.min_caption_chars, cfg.max_caption_chars,
             cfg.drop_boilerplate_captions)
    why = quality_filters.caption_reason(row["caption"], *rules)
    if why and any(not quality_filters.caption_reason(c, *rules) for c in row.get("alt_captions") or ()):
        return ""
    return why


def _subset(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["key"], pa.array(keys, pa.string())))


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return round(sum(v) / len(v), 6) if v else None
