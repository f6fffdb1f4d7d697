"""Publishing a dataset version: shards, ledger.parquet / sizes.json / stats.json and the manifest (last).

Incremental: a version extends the latest published version of the same dataset settings in this work
folder (`versions.json`): every shard of that version whose samples are all still successes (same
img2dataset sample) is referenced, not rewritten — its manifest entry is `../<earlier artifact>/shards/
NNNNN.tar` with that file's sha256 and size, verified like the version's own files (slip_core.artifacts).
Only the remaining successes (new rows, --retry-failed successes, samples of an earlier shard that lost
one of its samples) are repacked, into this version's own `shards/NNNNN.tar`: an increment of 1% writes
about 1% of the bytes. Repacking is byte-deterministic: samples in (img2dataset group, shard, key) order,
fixed tar headers, so the same inputs and history give byte-identical shards.

The ledger stays in the engine (datasets/ledger.py) and is streamed to parquet; repacking reads it in
batches ordered by source shard and holds one source shard in memory at a time. So does the quality pass
(apply_quality): one shard's fingerprints at a time become rule rows on disk, and only key, exact id and
pHash of the successes are held for the eval-overlap and dedup decisions.
"""
from __future__ import annotations

import collections
import hashlib
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import artifacts, identity, storage
from slip_core.config import to_dict
from slip_core.failpoints import failpoint
from slip_core.store import Store

from datasets import engine, tarshards
from datasets import quality as quality_pass  # issue 10: dedup, decontamination, filters
from datasets.config import PARALLEL_FIELDS, DatasetConfig
from datasets.ledger import (LEDGER_SCHEMA, SOURCE_ORDER, build_ledger, ledger_fingerprint, ledger_sql, status_summary, success_by_shard,
                             success_shards)
from datasets.quality import fingerprint

VERSIONS_FILE = "versions.json"  # in the work folder: {settings hash: [artifact folder names, oldest first]}
SHARD_ORDER = SOURCE_ORDER  # the repack order (deterministic)


def iter_shard_samples(tar_url: str):
    """(i2d key, {ext: bytes}) from an img2dataset tar, in key order (img2dataset writes samples in
    completion order; sorting makes the published shards byte-identical across identical builds).
    One source shard is held in memory at a time (10k samples of 256 px JPEG: ~250 MB). img2dataset writes
    plain regular files only, so a truncated tar, a link or an unsafe member name means a damaged or
    tampered work dir: tarshards raises (BadTar / UnsafeMember) and nothing is published from it."""
    fs, p = storage.url_to_fs(tar_url)
    by_key: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with fs.open(p, "rb", block_size=1 << 22) as f:
        for name, data in tarshards.iter_members(f):
            parsed = tarshards.split_name(name)
            if parsed is not None:
                by_key[parsed[0]][parsed[1]] = data
    for key in sorted(by_key):
        yield key, by_key[key]


# --------------------------------------------------------------------------------------- shard plan

def base_version(work: str, settings: str, parent: str, root: str) -> str | None:
    """Root of the latest earlier version published from this work folder with the same settings that is
    still intact (the version this one extends), or None."""
    url = storage.join(work, VERSIONS_FILE)
    versions = json.loads(storage.read_text(url)).get(settings, []) if storage.exists(url) else []
    for name in reversed(versions):
        cand = storage.join(parent, name)
        if cand.rstrip("/") != root.rstrip("/") and artifacts.is_complete(cand):
            return cand
    return None


def record_version(work: str, settings: str, root: str) -> None:
    url = storage.join(work, VERSIONS_FILE)
    versions = json.loads(storage.read_text(url)) if storage.exists(url) else {}
    name = root.rstrip("/").rsplit("/", 1)[-1]
    versions[settings] = [v for v in versions.get(settings, []) if v != name] + [name]
    storage.atomic_write_text(url, json.dumps(versions, indent=1, sort_keys=True))


def plan_shards(con: duckdb.DuckDBPyConnection, base: str | None, samples_per_shard: int) -> list[artifacts.FileEntry]:
    """Fill `ledger.shard`: successes of the base version's intact shards keep them (as `../<artifact>/...`);
    the others get this version's own shards/NNNNN.tar in repack order. Returns the reused file entries."""
    reused: list[artifacts.FileEntry] = []
    if base is not None:
        m = artifacts.load_manifest(base)
        name = base.rstrip("/").rsplit("/", 1)[-1]
        entries = {artifacts.relative_to_sibling(name, f.path): f for f in m.files if f.path.endswith(".tar")}
        src = engine.lit(engine.path(con, storage.join(base, "ledger.parquet")))
        # ref: the base ledger's shard, as seen from this version (a sibling artifact folder). A sample is the
        # same when its img2dataset source (attempt/group|shard|key, relative to the work folder) is.
        con.execute(f"""CREATE TEMP TABLE base_loc AS SELECT key, source,
                CASE WHEN starts_with(shard, '../') THEN shard ELSE '../' || ? || '/' || shard END AS ref
            FROM read_parquet({src}) WHERE status = 'success'""", [name])
        con.execute("""CREATE TEMP TABLE reusable AS SELECT b.ref FROM base_loc b
            LEFT JOIN ledger_v l ON l.key = b.key AND l.status = 'success'
                 AND regexp_extract(l.source, '.*/attempts/(.*)', 1) = regexp_extract(b.source, '.*/attempts/(.*)', 1)
            GROUP BY b.ref HAVING count(*) = count(l.key)""")
        set_shards(con, """SELECT l.ord, b.ref AS new_shard FROM ledger l JOIN base_loc b ON b.key = l.key
            WHERE b.ref IN (SELECT ref FROM reusable)""")
        refs = [r[0] for r in con.execute("SELECT ref FROM reusable ORDER BY ref").fetchall()]
        missing = [r for r in refs if r not in entries]
        if missing:
            raise artifacts.ManifestError(f"base version {base} ledger names shards its manifest lacks: {missing[:3]}")
        reused = [artifacts.FileEntry(r, entries[r].sha256, entries[r].size) for r in refs]
    set_shards(con, f"""SELECT ord, printf('shards/%05d.tar', (row_number() OVER (ORDER BY {SHARD_ORDER}) - 1)
                                  // {int(samples_per_shard)}) AS new_shard
        FROM ledger_v WHERE status = 'success' AND shard = ''""")
    return reused


def set_shards(con: duckdb.DuckDBPyConnection, assignment_sql: str) -> None:
    """ledger.shard from `assignment_sql` (ord, new_shard) for the rows it lists. The table is rebuilt (a
    join, which spills) rather than UPDATEd (DuckDB keeps updates in memory: OOM at millions of rows)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE shard_assignment AS {assignment_sql}")
    con.execute("""CREATE OR REPLACE TEMP TABLE ledger AS
        SELECT l.* REPLACE (coalesce(a.new_shard, l.shard) AS shard)
        FROM ledger l LEFT JOIN shard_assignment a ON a.ord = l.ord""")
    con.execute("DROP TABLE shard_assignment")


# ------------------------------------------------------------------------------------------- repack

class _ShardWriter:
    """Writes this version's own output shards one after another (atomically, each)."""

    def __init__(self, root: str):
        self.root, self.name, self.cm, self.tw = root, None, None, None
        self.sizes: dict[str, int] = {}

    def add(self, shard: str, key: str, sample: dict[str, bytes]) -> None:
        if shard != self.name:
            self.close()
            self.name, self.cm = shard, storage.atomic_open(storage.join(self.root, shard), "wb")
            self.tw = tarshards.TarWriter(self.cm.__enter__())
            self.sizes[shard] = 0
        if "json" in sample:
            meta = json.loads(sample["json"])
            meta["i2d_key"], meta["key"] = meta.get("key"), key
            sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
        for ext in sorted(sample):
            self.tw.add(f"{key}.{ext}", sample[ext])
        self.sizes[shard] += 1
        failpoint("publish.sample_written")  # crash tests (slip_core/failpoints.py)

    def close(self) -> None:
        if self.tw is not None:
            self.tw.close()
            self.cm.__exit__(None, None, None)
            failpoint("publish.shard_closed")
            self.tw = None

    def abort(self, e: BaseException) -> None:
        if self.tw is not None:  # drop the partial shard (atomic_open removes its temp file)
            self.cm.__exit__(type(e), e, e.__traceback__)
            self.tw = None


def _source_shards(con: duckdb.DuckDBPyConnection):
    """(gpath, shard, {i2d key: (dataset key, output shard)}) per source shard, in repack order, streamed."""
    for gpath, s, t in success_by_shard(con, "i2d_key, key, shard", "NOT starts_with(shard, '../')"):
        yield gpath, s, {ik: (k, out) for ik, k, out in zip(*(t[c].to_pylist() for c in ("i2d_key", "key", "shard")))}


def repack_from_engine(con: duckdb.DuckDBPyConnection, root: str) -> dict[str, int]:
    """Copy each success the ledger assigns to one of this version's shards from its img2dataset shard into
    root/<shard> under its dataset key. Returns {own shard path: samples}."""
    writer = _ShardWriter(root)
    try:
        for gpath, s, wanted in _source_shards(con):
            for ik, sample in iter_shard_samples(fingerprint.shard_url(gpath, s)):
                hit = wanted.pop(ik, None)
                if hit is not None:
                    writer.add(hit[1], hit[0], sample)
            if wanted:
                raise RuntimeError(f"{len(wanted)} successes listed for {gpath} shard {s} are not in its tar")
    except BaseException as e:
        writer.abort(e)
        raise
    writer.close()
    return writer.sizes


def repack(ledger: pa.Table, root: str, samples_per_shard: int) -> tuple[pa.Table, dict[str, int]]:
    """repack_from_engine for a ledger given as an Arrow table (LEDGER_SCHEMA): returns it with `shard`
    filled in, and sizes."""
    with engine.connect() as con:
        con.register("ledger_in", ledger.append_column("ord", pa.array(range(len(ledger)), pa.int64())))
        con.execute("""CREATE TEMP TABLE ledger AS SELECT * REPLACE ('' AS shard),
            split_part(source, '|', 1) AS gpath, TRY_CAST(split_part(source, '|', 2) AS BIGINT) AS src_shard,
            split_part(source, '|', 3) AS i2d_key FROM ledger_in""")
        con.execute("CREATE TEMP VIEW ledger_v AS SELECT * FROM ledger")
        plan_shards(con, None, samples_per_shard)
        sizes = repack_from_engine(con, root)
        cols = ", ".join(ledger.column_names)
        return con.sql(f"SELECT {cols} FROM ledger ORDER BY ord").to_arrow_table().cast(ledger.schema), sizes


# ------------------------------------------------------------------------------------------ quality

def _success_sources(con: duckdb.DuckDBPyConnection):
    """(tar url, i2d keys, dataset keys) per img2dataset shard holding successes (streamed)."""
    for gpath, s, t in success_by_shard(con):
        yield fingerprint.shard_url(gpath, s), t["i2d_key"], t["key"]


def fingerprint_shards(con: duckdb.DuckDBPyConnection, cfg: DatasetConfig) -> int:
    """Fingerprint caches for every img2dataset shard holding a success, the missing ones hashed on
    cfg.hash_engine (fingerprint.ensure_cached). Returns the number of images hashed now."""
    return fingerprint.ensure_cached([fingerprint.shard_url(g, s) for g, s in success_shards(con)], engine=cfg.hash_engine)


QUALITY_RULES = "quality_rules.parquet"  # in the engine's temp folder: the pass's per-sample rows


def apply_quality(con: duckdb.DuckDBPyConnection, cfg: DatasetConfig) -> dict:
    """The quality pass on the engine's ledger, shard by shard: missing fingerprint caches are computed on
    the hash engine, then each shard's fingerprints become rule rows (key, hashes, per-sample reason;
    quality.rule_table) streamed to parquet in the engine's temp folder (view `quality_fp`, read again
    for the published ledger's fingerprint columns). The CLIP score, eval-overlap and dedup decisions
    (quality.decide) need only key, exact id and pHash of the success rows; they are written back into
    `ledger`. Returns the report."""
    q = cfg.quality
    fingerprint_shards(con, cfg)
    path = storage.join(engine.scalar(con, "SELECT current_setting('temp_directory')"), QUALITY_RULES)
    with pq.ParquetWriter(path, quality_pass.RULE_SCHEMA) as w:
        for fps in fingerprint.iter_fingerprints(_success_sources(con)):
            w.write_table(quality_pass.rule_table(fps, q))
    con.execute(f"CREATE OR REPLACE TEMP VIEW quality_fp AS SELECT * FROM read_parquet({engine.lit(path)})")
    scores = quality_pass.clip_score_table(quality_pass.ledger_samples(fingerprint.iter_source_samples(_success_sources(con))),
                                           q.clip_score_checkpoint) if q.clip_score_checkpoint else None
    previous = quality_pass.load_previous(q.previous_dataset) if q.previous_dataset else None
    ledger_keys = con.sql("SELECT key FROM ledger WHERE key IS NOT NULL").to_arrow_table()["key"] if previous is not None else None
    # the exact id (orig_sha256 or sha256) is all dedup reads of the two hashes
    filtered, report = quality_pass.decide(_rule_rows(con), q, previous, None, scores, ledger_keys)
    con.register("quality_out", filtered)
    con.execute("""CREATE OR REPLACE TEMP TABLE ledger AS
        SELECT l.* REPLACE (CASE WHEN q.key IS NOT NULL AND l.status = 'success' THEN 'filtered' ELSE l.status END AS status,
                            CASE WHEN q.key IS NOT NULL AND l.status = 'success' THEN q.reason ELSE l.reason END AS reason)
        FROM ledger l LEFT JOIN quality_out q ON q.key = l.key""")
    con.unregister("quality_out")
    return report


def _rule_rows(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """quality_fp as decide takes it: sorted by key (so dedup needs no sorted copy), the two hashes reduced
    to the exact id (orig_sha256 or sha256) dedup compares."""
    sql = """SELECT key, CASE WHEN orig_sha256 <> '' THEN orig_sha256 ELSE sha256 END AS sha256, '' AS orig_sha256,
                    phash, reason FROM quality_fp ORDER BY key"""
    return con.sql(sql).to_arrow_reader(engine.BATCH_ROWS).read_all().cast(quality_pass.RULE_SCHEMA)


def _ledger_out_sql(quality: bool) -> str:
    if not quality:
        return ledger_sql()
    cols = ", ".join(f"l.{c}" for c in LEDGER_SCHEMA.names)
    return (f"SELECT {cols}, f.sha256 AS image_sha256, f.orig_sha256, lower(hex(f.phash)) AS phash "
            "FROM ledger_out l LEFT JOIN quality_fp f ON f.key = l.key ORDER BY l.ord")


# ------------------------------------------------------------------------------------------ publish

# The dataset stage's code: its entry (filter -> plan -> download -> publish, named as a string because it
# imports this module) and everything that reaches, img2dataset's `python -m` wrapper included. The
# CLIP-score filter is the only dataset code that loads a model: unless it is on, model code (reached only
# through slip_core.checkpoint) is not part of the dataset's identity.
DATASET_CODE = ("datasets.pipeline",)
MODEL_CODE = ("slip_core.checkpoint",)


def dataset_identity(captions_sha256: str, cfg: DatasetConfig) -> identity.StageIdentity:
    """Identity of a dataset built from the caption table with manifest sha256 `captions_sha256` (the table's
    own identity, hence the caption cleaning code, is inside that sha). Parallelism settings are left out."""
    q = cfg.quality
    inputs = {"captions": captions_sha256}
    if q.clip_score_checkpoint:
        inputs["clip_score_checkpoint"] = storage.sha256_file(q.clip_score_checkpoint)
    if q.previous_dataset:
        inputs["previous_dataset"] = artifacts.load_manifest(q.previous_dataset).sha256
    config = {k: v for k, v in to_dict(cfg).items() if k not in PARALLEL_FIELDS}
    return identity.stage("dataset", cfg.name, inputs, config, DATASET_CODE,
                          stop=() if q.clip_score_checkpoint else MODEL_CODE)


def publish(table_path: str, work: str, cfg: DatasetConfig, store: str, upstream: dict | None = None,
            extra_stats: dict | None = None, malformed_path: str | None = None) -> str:
    """Ledger, shards (incrementally), ledger/sizes/stats and the dataset manifest (last). Returns the manifest
    URL; an identical earlier publication (same table, settings, ledger and history) is returned as is."""
    with engine.connect() as con:
        build_ledger(con, table_path, work, malformed_path)
        qreport = apply_quality(con, cfg) if cfg.quality.enabled else None
        table_sha = storage.sha256_file(table_path)
        ident = {k: v for k, v in to_dict(cfg).items() if k not in PARALLEL_FIELDS}
        settings = hashlib.sha256(json.dumps([cfg.name, ident], sort_keys=True, default=str).encode()).hexdigest()[:16]
        captions = (upstream or {}).get("captions")  # without a caption-table artifact: the table file itself
        stage = dataset_identity(captions.sha256 if captions else table_sha, cfg)
        root = Store(store).stage_root(stage, ledger_fingerprint(con))
        murl = artifacts.manifest_url(root)
        if artifacts.is_complete(murl):  # published before and intact
            record_version(work, settings, root)
            return murl
        storage.remove_temp_files(root)  # partial shards of a publish killed mid-write (callers hold the work lock)
        base = base_version(work, settings, root.rstrip("/").rsplit("/", 1)[0], root)
        reused = plan_shards(con, base, cfg.number_sample_per_shard)
        own = repack_from_engine(con, root)
        if qreport is not None:
            storage.atomic_write_text(storage.join(root, quality_pass.REPORT_FILE),
                                      json.dumps(qreport, indent=1, sort_keys=True, default=str))
        engine.copy_to_parquet(con, _ledger_out_sql(qreport is not None), storage.join(root, "ledger.parquet"))
        sizes = dict(con.execute("SELECT shard, count(*) FROM ledger WHERE status = 'success' GROUP BY shard").fetchall())
        storage.atomic_write_text(storage.join(root, "sizes.json"), json.dumps(sizes, indent=1, sort_keys=True))
        attempts = [r[0] for r in con.execute("SELECT DISTINCT attempt FROM ledger_v WHERE attempt <> '' ORDER BY 1").fetchall()]
        stats = {**status_summary(con), "shards": len(sizes), "num_samples": sum(sizes.values()),
                 "attempts": attempts, "input_table_sha256": table_sha, "work_dir": work,
                 "incremental": {"extends": base.rstrip("/").rsplit("/", 1)[-1] if base else "",
                                 "reused_shards": len(reused), "new_shards": len(own),
                                 "new_samples": sum(own.values())},
                 **(extra_stats or {})}  # no timings: same inputs and history -> byte-identical artifact
    if qreport is not None:
        stats["quality"] = quality_pass.summary(qreport)
    storage.atomic_write_text(storage.join(root, "stats.json"), json.dumps(stats, indent=1, sort_keys=True, default=str))
    files = sorted(own) + ["ledger.parquet", "sizes.json", "stats.json"] + ([quality_pass.REPORT_FILE] if qreport else [])
    m = artifacts.build_manifest(root, files, kind="dataset", name=cfg.name, config=to_dict(cfg), upstream=upstream or {},
                                 metrics={"num_samples": stats["num_samples"], "num_rows": stats["rows"],
                                          "success_rate": stats["success_rate"], "shards": len(sizes),
                                          "input_table_sha256": table_sha, "shard_samples": sizes,
                                          **{f"n_{k}": v for k, v in stats["by_status"].items()}},
                                 external_files=reused, identity=stage.to_dict())
    failpoint("publish.before_manifest")
    url = artifacts.publish(m, root)
    record_version(work, settings, root)
    return url
