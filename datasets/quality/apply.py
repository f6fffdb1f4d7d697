"""Dataset quality pass: filters, eval decontamination and dedup applied to a download ledger.

    fps = fingerprint.fingerprint_ledger(ledger)            # once per image, from the shards
    ledger, report = apply_quality_report(ledger, fps, cfg, previous)

Columnar throughout: `rule_table` evaluates the per-sample rules on a batch of fingerprints (the dataset
stage calls it shard by shard and keeps only key, hashes and reason), `decide` adds the CLIP score, eval
overlap and dedup decisions as Arrow tables; no Python object per row outlives a shard.

Only `success` rows can change, and only to `filtered` with a reason; every other row and column is left
as is, so each input row still has exactly one status. Rules run in this order and the first failing one
gives the reason: undecodable image, caption rules, image size rules, CLIP score, eval overlap, and last
dedup — so the sample kept for a duplicate cluster is one that passed everything else.

The published ledger carries the fingerprints (`fingerprint.attach_to_ledger`), so the next version of the
dataset gets `previous` from it (`load_previous(manifest)`, or `QualityConfig.previous_dataset`).
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets.quality import decontaminate, dedup, fingerprint
from datasets.quality import filters as quality_filters
from datasets.quality.config import QualityConfig
from slip_core import artifacts, storage
from slip_core.config import to_dict

REPORT_FILE = "quality.json"  # the report, published next to ledger.parquet


PREVIOUS_COLUMNS = ("key", "status", "reason", "image_sha256", "orig_sha256", "phash")


def load_previous(dataset_manifest: str) -> pa.Table:
    """`previous` for apply_quality from a published dataset: the columns of its ledger.parquet that dedup
    needs, with the fingerprint columns (fingerprint.attach_to_ledger) it has when it was built with the
    quality pass."""
    url = storage.join(artifacts.artifact_root(dataset_manifest), "ledger.parquet")
    fs, p = storage.url_to_fs(url)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        ledger = pf.read(columns=[c for c in PREVIOUS_COLUMNS if c in pf.schema_arrow.names])
    return dedup.previous_table(ledger)


def run_quality(ledger: pa.Table, cfg: QualityConfig, hash_engine: str = "processes") -> tuple[pa.Table, pa.Table, dict]:
    """The whole pass on a ledger held as an Arrow table: fingerprints (cached per shard, hashed on
    `hash_engine`), CLIP scores if configured, the previous version if configured, apply_quality_report.
    Returns (ledger, fingerprints, report). The dataset stage streams shard by shard instead
    (datasets/publish.apply_quality over rule_table + decide)."""
    fps = fingerprint.fingerprint_ledger(ledger, engine=hash_engine)
    scores = clip_scores_for_ledger(ledger, cfg.clip_score_checkpoint) if cfg.clip_score_checkpoint else None
    previous = load_previous(cfg.previous_dataset) if cfg.previous_dataset else None
    out, report = apply_quality_report(ledger, fps, cfg, previous, scores=scores)
    return out, fps, report


def summary(report: dict) -> dict:
    """The few numbers of a report worth keeping in the dataset's stats.json."""
    return {k: report.get(k) for k in ("success_in", "success_out", "filtered", "by_reason")}


def audit(dataset_manifest: str, cfg: QualityConfig) -> dict:
    """What the quality pass would remove from an already published dataset (its shards are read; nothing
    is written): the report of the pass on the published ledger, its shards fingerprinted one at a time
    into rule rows (as the dataset stage does)."""
    root = artifacts.artifact_root(dataset_manifest)
    fs, p = storage.url_to_fs(storage.join(root, "ledger.parquet"))
    with fs.open(p, "rb") as f:
        ledger = pq.read_table(f, columns=["key", "status", "shard"])
    shards = pc.unique(ledger["shard"].filter(pc.equal(ledger["status"], "success"))).to_pylist()
    tars = [storage.join(root, s) for s in sorted(shards)]
    rules = pa.concat_tables([rule_table(fingerprint.to_table([]), cfg)]  # published keys = dataset keys
                             + [rule_table(fingerprint.fingerprint_tars([url]), cfg) for url in tars])
    scores = None
    if cfg.clip_score_checkpoint:
        samples = ((k, _image(s), s.get("txt", b"").decode("utf-8", "replace"))
                   for url in tars for k, s in fingerprint.iter_tar_samples(url))
        scores = clip_score_table(samples, cfg.clip_score_checkpoint)
    success = ledger["key"].filter(pc.equal(ledger["status"], "success"))
    missing = pc.sum(pc.invert(pc.is_in(success, value_set=rules["key"].combine_chunks()))).as_py() or 0
    if missing:
        raise ValueError(f"{missing} success rows of {dataset_manifest} are not in the shards they name")
    previous = load_previous(cfg.previous_dataset) if cfg.previous_dataset else None
    return decide(fingerprint.last_per_key(rules), cfg, previous, None, scores, ledger["key"])[1]


def _image(sample: dict) -> bytes:
    return next((sample[e] for e in fingerprint.IMAGE_EXTS if e in sample), b"")


def ledger_samples(samples) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) from (dataset key, webdataset sample) pairs: what CLIP scoring takes."""
    for k, s in samples:
        yield k, _image(s), s["txt"].decode("utf-8", "replace") if "txt" in s else ""


def clip_scores_for_ledger(ledger: pa.Table, checkpoint, batch_size: int = 64) -> dict[str, float]:
    """{key: CLIP score} of the ledger's success rows (reads the shards; pass to apply_quality(scores=))."""
    return dict(quality_filters.clip_scores(ledger_samples(fingerprint.iter_ledger_samples(ledger)), checkpoint, batch_size))


def clip_score_table(samples, checkpoint, batch_size: int = 64, chunk: int = 1 << 16) -> pa.Table:
    """(key, score) of quality_filters.clip_scores over (key, image, caption) samples, gathered in Arrow
    chunks (a Python tuple lives only until its chunk is converted)."""
    chunks, keys, vals = [], [], []
    for k, v in quality_filters.clip_scores(samples, checkpoint, batch_size):
        keys.append(k)
        vals.append(v)
        if len(keys) == chunk:
            chunks.append(pa.record_batch([pa.array(keys, pa.string()), pa.array(vals, pa.float64())], ["key", "score"]))
            keys, vals = [], []
    chunks.append(pa.record_batch([pa.array(keys, pa.string()), pa.array(vals, pa.float64())], ["key", "score"]))
    return pa.Table.from_batches(chunks)


def apply_quality(ledger: pa.Table, fingerprints: pa.Table, cfg: QualityConfig, previous: pa.Table | None = None,
                  **kwargs) -> pa.Table:
    """The ledger with quality decisions applied (see apply_quality_report)."""
    return apply_quality_report(ledger, fingerprints, cfg, previous, **kwargs)[0]


def apply_quality_report(ledger: pa.Table, fingerprints: pa.Table, cfg: QualityConfig,
                         previous: pa.Table | None = None, eval_index: decontaminate.EvalIndex | None = None,
                         scores: dict[str, float] | pa.Table | None = None) -> tuple[pa.Table, dict]:
    """(ledger with success rows possibly turned `filtered` + reason, report dict).

    `fingerprints` must cover every success row (fingerprint.fingerprint_ledger). `eval_index` defaults to
    decontaminate.load_eval_index(cfg.decontaminate); `scores` ({key: CLIP score} or a (key, score) table)
    is required when cfg.clip_score_checkpoint is set (clip_scores_for_ledger computes it)."""
    status = ledger["status"]
    success = pc.fill_null(pc.equal(status, "success"), False)
    success_keys = ledger["key"].filter(success)
    missing = success_keys.filter(pc.invert(pc.is_in(success_keys, value_set=fingerprints["key"].combine_chunks())))
    if len(missing):
        raise ValueError(f"{len(missing)} success rows have no fingerprint (first: {missing[:3].to_pylist()})")
    fps = fingerprint.last_per_key(fingerprints.filter(pc.is_in(fingerprints["key"], value_set=success_keys.combine_chunks())))
    filtered, report = decide(rule_table(fps, cfg), cfg, previous, eval_index, scores, ledger["key"])
    idx = pc.index_in(ledger["key"], value_set=filtered["key"].combine_chunks())
    hit = pc.and_(success, pc.is_valid(idx))
    new = ledger
    for name, value in (("status", pa.scalar("filtered")), ("reason", filtered["reason"].combine_chunks().take(idx))):
        field = ledger.schema.field(name)
        col = pc.if_else(hit, value, ledger[name]).cast(field.type)
        new = new.set_column(ledger.schema.get_field_index(name), field, col)
    return new, report


# ----------------------------------------------------------------------------- the rules, columnar

RULE_SCHEMA = pa.schema([("key", pa.string()), ("sha256", pa.string()), ("orig_sha256", pa.string()),
                         ("phash", pa.binary(fingerprint.PHASH_BYTES)), ("reason", pa.string())])


def rule_table(fps: pa.Table, cfg: QualityConfig) -> pa.Table:
    """RULE_SCHEMA rows of fingerprints (FINGERPRINT_SCHEMA): what the later rules need, and `reason`, the
    first failing per-sample rule ('' = passes): undecodable image, caption rules, image size rules.
    Called per shard by the dataset stage, so memory is bounded by a shard; no caption column survives."""
    n = len(fps)
    bad = pc.or_(pc.fill_null(pc.not_equal(fps["error"], ""), False), pc.is_null(fps["phash"])).to_numpy(zero_copy_only=False)
    reason = np.full(n, "", object)
    reason[bad] = "undecodable_image"
    rules = (cfg.min_caption_words, cfg.max_caption_words, cfg.min_caption_chars, cfg.max_caption_chars,
             cfg.drop_boilerplate_captions)
    todo = np.flatnonzero(~bad)
    if any(rules) and len(todo):
        reason[todo] = caption_rule_reasons(fps["caption"].take(pa.array(todo)), fps["alt_captions"].take(pa.array(todo)), rules)
        todo = todo[reason[todo] == ""]
    if (cfg.min_image_side or cfg.max_aspect_ratio) and len(todo):
        reason[todo] = _image_reasons(fps["orig_width"].take(pa.array(todo)), fps["orig_height"].take(pa.array(todo)), cfg)
    return pa.table([fps["key"], fps["sha256"], fps["orig_sha256"], fps["phash"], pa.array(reason, pa.string())],
                    schema=RULE_SCHEMA)


def caption_rule_reasons(captions: pa.ChunkedArray, alt_captions: pa.ChunkedArray, rules: tuple) -> np.ndarray:
    """A sample fails the caption rules only if its caption AND every alternative (YFCC title/description,
    one of which the loader picks) fail; the reason is the main caption's. Columnar: the alternatives are
    judged as one flat array and reduced per row."""
    why = quality_filters.caption_reasons(captions, *rules)
    alts = alt_captions.combine_chunks()
    flat = pc.list_flatten(alts)
    if len(flat):
        rows = pc.list_parent_indices(alts).to_numpy(zero_copy_only=False)
        passes = np.bincount(rows[quality_filters.caption_reasons(flat, *rules) == ""], minlength=len(why)) > 0
        why[passes] = ""
    return why


def _image_reasons(width: pa.Array, height: pa.Array, cfg: QualityConfig) -> np.ndarray:
    """quality_filters.image_reason, vectorised (the same comparisons in float64)."""
    w = np.asarray(pc.fill_null(width, 0).to_numpy(zero_copy_only=False), np.float64)
    h = np.asarray(pc.fill_null(height, 0).to_numpy(zero_copy_only=False), np.float64)
    out = np.full(len(w), "", object)
    unknown = (w == 0) | (h == 0)
    out[unknown] = "undecodable_image"
    lo, hi = np.minimum(w, h), np.maximum(w, h)
    small = ~unknown & (lo < cfg.min_image_side) if cfg.min_image_side else np.zeros(len(w), bool)
    out[small] = f"image_min_side<{cfg.min_image_side}"
    if cfg.max_aspect_ratio:
        with np.errstate(divide="ignore", invalid="ignore"):
            wide = ~unknown & ~small & (hi / lo > cfg.max_aspect_ratio)
        out[wide] = f"aspect_ratio>{cfg.max_aspect_ratio:g}"
    return out


def score_table(scores: dict[str, float] | pa.Table) -> pa.Table:
    if isinstance(scores, pa.Table):
        return scores.select(["key", "score"])
    return pa.table({"key": pa.array(list(scores), pa.string()), "score": pa.array(list(scores.values()), pa.float64())})


def decide(rules: pa.Table, cfg: QualityConfig, previous: pa.Table | None = None,
           eval_index: decontaminate.EvalIndex | None = None, scores: dict | pa.Table | None = None,
           ledger_keys=None) -> tuple[pa.Table, dict]:
    """(filtered: key, reason of every sample the pass removes; report) for the success samples `rules`
    (rule_table rows, one per key). Rule order: the per-sample reasons, CLIP score, eval overlap, dedup.
    `ledger_keys`: every key of the current ledger (dedup.find_duplicates)."""
    if cfg.clip_score_checkpoint and scores is None:
        raise ValueError("clip_score_checkpoint is set: compute scores with clip_scores_for_ledger() and pass scores=")
    scores = score_table(scores) if scores is not None else None
    reason = rules["reason"]
    if cfg.clip_score_checkpoint:
        s = scores["score"].combine_chunks().take(pc.index_in(rules["key"], value_set=scores["key"].combine_chunks()))
        s = s.to_numpy(zero_copy_only=False).astype(np.float64)  # null -> nan
        passing = pc.equal(reason, "").to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            low = passing & (s < cfg.min_clip_score)  # nan compares False
        reason = pc.if_else(pa.array(passing & np.isnan(s)), "undecodable_image", reason)
        reason = pc.if_else(pa.array(low), f"clip_score<{cfg.min_clip_score:g}", reason)
    rules = rules.set_column(rules.schema.get_field_index("reason"), "reason", reason)
    alive_mask = pc.equal(rules["reason"], "")
    parts = [rules.filter(pc.invert(alive_mask)).select(["key", "reason"])]
    n_in = len(rules)
    alive = (rules if pc.all(alive_mask).as_py() is not False else rules.filter(alive_mask)).drop_columns(["reason"])
    del rules, alive_mask  # callers pass the table as a temporary: freed here, before the indices are built
    report: dict = {"config": to_dict(cfg)}
    if cfg.decontaminate:
        index = eval_index or decontaminate.load_eval_index(cfg.decontaminate, cfg.decontam_hamming)
        overlaps = decontaminate.overlap_table(alive, index)
        parts.append(_reasons(overlaps["key"], decontaminate.OVERLAP_PREFIX, overlaps["dataset"]))
        report["decontamination"] = decontaminate.overlap_report(overlaps, index)
        if len(overlaps):  # a filter is a copy: only when something overlaps
            alive = alive.filter(pc.invert(pc.is_in(alive["key"], value_set=overlaps["key"].combine_chunks())))
    if cfg.exact_dedup or cfg.near_dup_hamming >= 0:
        res = dedup.find_duplicates(alive, cfg.near_dup_hamming if cfg.near_dup_hamming >= 0 else None,
                                    cfg.exact_dedup, previous, ledger_keys)
        dups = res.duplicates
        parts.append(_reasons(dups["key"], dedup.DUP_PREFIX, dups["duplicate_of"]))
        kinds = pc.value_counts(dups["kind"]).to_pylist() if len(dups) else []
        report["dedup"] = {"kept": len(res.kept), "duplicates": len(dups), "by_kind": {d["values"]: d["counts"] for d in kinds},
                           "max_distance": max(pc.max(dups["distance"]).as_py() or 0, 0) if len(dups) else 0}
    filtered = pa.concat_tables(parts)
    # the reason's kind: 'eval_overlap:<dataset>' whole, else the text before its first ':', '<' or '>'
    kind = pc.if_else(pc.starts_with(filtered["reason"], decontaminate.OVERLAP_PREFIX), filtered["reason"],
                      pc.replace_substring_regex(filtered["reason"], r"(?s)[:<>].*$", ""))
    by_reason = {d["values"]: d["counts"] for d in pc.value_counts(kind).to_pylist()} if len(filtered) else {}
    report.update({"success_in": n_in, "success_out": n_in - len(filtered), "filtered": len(filtered),
                   "by_reason": dict(sorted(by_reason.items())),
                   "clip_score_mean": _mean(scores["score"]) if scores is not None and len(scores) else None})
    return filtered, report


def _reasons(keys, prefix: str, suffix) -> pa.Table:
    return pa.table({"key": keys.cast(pa.string()),
                     "reason": pc.binary_join_element_wise(pa.scalar(prefix), suffix.cast(pa.string()), "")})


def _mean(values) -> float | None:
    v = pc.drop_null(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values).to_numpy(zero_copy_only=False)
    v = v[~np.isnan(v)]
    return round(float(np.cumsum(v)[-1]) / len(v), 6) if len(v) else None  # cumsum: left to right, as sum() adds
