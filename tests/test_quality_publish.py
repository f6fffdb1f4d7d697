"""The dataset stage's quality pass (publish.apply_quality: shard by shard from the engine's ledger, rule rows
streamed to parquet, decisions as Arrow tables) decides exactly what the in-memory pass (quality.run_quality
on the Arrow ledger) decides, and publishes the same fingerprint columns - for a first version (real pHashes
of real JPEGs, hashed on the process pool) and for an increment that extends it through previous_dataset.
Synthetic img2dataset work folder (datasets/synthetic.py: real parquet, real tars, no network)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets import ledger, plan, publish, synthetic
from datasets.config import make_config
from datasets.quality import QualityConfig, fingerprint, run_quality
from slip_core import artifacts, storage

QUALITY = QualityConfig(exact_dedup=True, near_dup_hamming=20, decontaminate=("digits",), drop_boilerplate_captions=True,
                        min_caption_words=2, max_caption_chars=40)
COLUMNS = ["key", "status", "reason", "image_sha256", "orig_sha256", "phash"]


def _cfg(**quality):
    from dataclasses import replace

    return replace(make_config({"name": "qpub", "number_sample_per_shard": 100, "shards_per_group": 3}, "tiny"),
                   quality=replace(QUALITY, **quality))


def _table(path: str, start: int, n: int) -> None:
    """A caption table whose captions hit every caption rule: camera file names, one word, too long, non-ASCII."""
    ids = np.arange(start, start + n)
    keys = [f"{i:09d}" for i in ids]
    caps = [f"IMG_{i:04d}" if i % 7 == 0 else "cat" if i % 11 == 0 else "long words " * 5 if i % 13 == 0
            else f"café número {i}" if i % 5 == 0 else f"a photo number {i}" for i in ids]
    pq.write_table(pa.table({"key": keys, "url": [f"http://127.0.0.1:9/img/{k}.jpg" for k in keys], "caption": caps}), path)


def _expected(table: str, work: str, q: QualityConfig) -> tuple[pa.Table, dict]:
    out, fps, report = run_quality(ledger.final_ledger(table, work), q)
    return fingerprint.attach_to_ledger(out, fps).select(COLUMNS), report


def _published(murl: str) -> tuple[pa.Table, dict]:
    root = artifacts.artifact_root(murl)
    led = pq.read_table(storage.join(root, "ledger.parquet")).select(COLUMNS)
    return led, json.loads(storage.read_text(storage.join(root, "quality.json")))


def test_streamed_quality_pass_equals_the_in_memory_pass(tmp_path):
    store, work = str(tmp_path / "store"), str(tmp_path / "store" / "dataset-work" / "qpub")
    t1, t2 = str(tmp_path / "t1.parquet"), str(tmp_path / "t2.parquet")
    _table(t1, 0, 700)
    cfg = _cfg()
    synthetic.build_work(t1, work, cfg)  # 64 distinct pool images: most successes are exact copies
    v1 = publish.publish(t1, work, cfg, store)
    got, got_report = _published(v1)
    want, want_report = _expected(t1, work, cfg.quality)
    assert got.equals(want.cast(got.schema))
    assert got_report == json.loads(json.dumps(want_report, sort_keys=True, default=str))
    by = got_report["by_reason"]
    assert {"boilerplate_caption", "caption_words", "caption_chars", "duplicate_of"} <= set(by), by
    assert 0 < got_report["success_out"] <= 64  # at most one sample per distinct pool image is kept

    # an increment extending v1 through previous_dataset: new rows with their own (distinct, seeded) hashes,
    # planted exact and near copies among them; v1's decisions stay
    _table(t2, 0, 1000)
    groups = plan.plan(t2, work, cfg)
    synthetic.fake_download(groups)
    synthetic.fake_fingerprints(groups, copy_every=10)
    cfg2 = _cfg(previous_dataset=v1)
    v2 = publish.publish(t2, work, cfg2, store)
    got2, got2_report = _published(v2)
    want2, want2_report = _expected(t2, work, cfg2.quality)
    assert got2.equals(want2.cast(got2.schema))
    assert got2_report == json.loads(json.dumps(want2_report, sort_keys=True, default=str))
    assert got2_report["dedup"]["by_kind"]["previous"] > 0 and got2_report["dedup"]["by_kind"]["near"] > 0
    v1_dups = got.filter(pc.starts_with(got["reason"], "duplicate_of:"))
    again = got2.filter(pc.is_in(got2["key"], value_set=v1_dups["key"]))
    assert again["reason"].to_pylist() == v1_dups["reason"].to_pylist()


def test_streamed_clip_score_filter_equals_the_in_memory_pass(tmp_path):
    """The CLIP-score rule on the streamed path (scores gathered shard by shard into an Arrow table) decides
    what run_quality decides with its {key: score} dict."""
    import torch

    from slip_core.checkpoint import save_checkpoint
    from slip_core.registry import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ckpt = str(tmp_path / "clip_tiny.pt")
    save_checkpoint(ckpt, build_model("CLIP_VIT_TINY"))  # random init: the mechanics, not the scores
    store, work = str(tmp_path / "store"), str(tmp_path / "store" / "dataset-work" / "qpub")
    table = str(tmp_path / "t.parquet")
    _table(table, 0, 150)
    cfg = _cfg(clip_score_checkpoint=ckpt, min_clip_score=0.0, exact_dedup=False, near_dup_hamming=-1, decontaminate=())
    synthetic.build_work(table, work, cfg)
    got, got_report = _published(publish.publish(table, work, cfg, store))
    want, want_report = _expected(table, work, cfg.quality)
    assert got.equals(want.cast(got.schema))
    assert got_report == json.loads(json.dumps(want_report, sort_keys=True, default=str))
    assert got_report["clip_score_mean"] is not None and "clip_score" in got_report["by_reason"]


def test_successes_grouped_by_shard_across_batches(tmp_path):
    """ledger.success_by_shard (what the quality pass and the repack read) yields each img2dataset shard once,
    whole, in source order, also when its rows straddle the engine's record batches."""
    from datasets import engine

    work = str(tmp_path / "store" / "dataset-work" / "qpub")
    table = str(tmp_path / "t.parquet")
    synthetic.write_table(table, 450)
    synthetic.build_work(table, work, _cfg())
    with engine.connect() as con:
        ledger.build_ledger(con, table, work)
        want = con.execute("SELECT gpath, src_shard, list(key ORDER BY i2d_key) FROM ledger_v WHERE status = 'success' "
                           "GROUP BY gpath, src_shard ORDER BY gpath, src_shard").fetchall()
        for rows in (7, 100, 65536):
            got = [(g, s, t["key"].to_pylist()) for g, s, t in ledger.success_by_shard(con, rows=rows)]
            assert got == want, rows
    assert len(want) == 5 and sum(len(k) for *_, k in want) == 405
