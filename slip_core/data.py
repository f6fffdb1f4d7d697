"""Streaming multi-view loader over webdataset shards: full passes or resampling, a cross-shard shuffle buffer,
and a data position that resumes exactly and survives a change of world size.

Streams. The data of an epoch is cut into S logical *streams* (S fixed when a run starts: BatchPlan), and
every optimizer step takes the next G/S usable samples of every stream (G the global batch). Rank r of W owns
streams [r·S/W, (r+1)·S/W) and its DataLoader workers split those; the samples of a step are ordered by stream
id. So a stream position never depends on the world size or the worker count, and a checkpoint written at W
ranks resumes at any W' dividing S: the new ranks take over the streams where they stood (no sample skipped
or repeated within the epoch); same W resumes bit for bit. Augmentation and caption randomness are seeded
from (seed, epoch, stream, lap, block, index) — never from the rank.

What a stream reads.
* Full pass (`resampled=False`, the reference's DistributedSampler): the shards are permuted per epoch
  (seeded), their samples concatenated (counts from sizes.json), and stream s gets the contiguous range
  [s·L, (s+1)·L), L = ⌊N/S⌋, cut at sample granularity (a stream may start mid-shard: the reader skips
  headers only, tarsamples `skip`). Each sample is used at most once per epoch; a stream that runs out
  (samples it had to skip as corrupt) starts a second lap over its range, counted as `padded`.
* Resampled (`resampled=True`, webdataset's ResampledShards): segment k of stream s is a whole shard drawn
  with replacement from (seed, epoch, s, k).
Shuffle buffer. A stream's segments are read `shuffle_shards` at a time (a block): their samples are drawn
interleaved in a seeded random order fixed by the claimed counts, and each run of `shuffle_chunk` of them is
permuted (seeded). Samples are raw bytes until permuted; decoding happens after.

Position of a stream = (lap, block, index in the block's shuffled order) plus skip counters. Resuming replays
the block's interleave order arithmetically, skips headers up to the chunk in progress, reads that chunk and
drops what was already used: a header scan of at most one block and one chunk of data per stream.
"""
from __future__ import annotations

import json
import re
import signal
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from slip_core import artifacts, storage, tarsamples
from slip_core.augment import AugmentConfig, BadImage, decode_image, make_views
from slip_core.tokenizer import tokenize

SHARD_RE = re.compile(r"(^|/)shards/[^/]+\.tar$")
# Skip counters (bad samples are counted, never trained on, never fatal): undecodable / missing image, image
# over the pixel cap, no usable caption, a shard that ends early (truncated/corrupt: what was read is kept),
# a member that is a link/device or whose name is absolute, has '..' or a control character (tarsamples),
# and `padded`: samples a full-pass stream took a second time because skips left its range short.
COUNTERS = ("ok", "corrupt", "too_large", "no_caption", "bad_tar", "unsafe_member", "padded")
EPOCH_ORDER_KEY = 0xE90C  # the per-epoch shard permutation of full passes (one for all streams)


# ------------------------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class Shard:
    url: str
    samples: int  # as the dataset's sizes.json says


def shard_urls(dataset_manifest_url: str) -> list[str]:
    """URLs of a dataset artifact's shards (`shards/*.tar` in its manifest), sorted: its own and, for an
    incremental version, the earlier versions' shards it references (`../<artifact>/shards/...`)."""
    return [s.url for s in dataset_shards(dataset_manifest_url)]


def dataset_shards(dataset_manifest_url: str) -> list[Shard]:
    """The shards of a dataset artifact (its own and referenced ones) with their sample counts (the manifest's
    `shard_samples`, else sizes.json — both keyed by manifest path — else counted by reading), sorted by URL."""
    url = artifacts.manifest_url(dataset_manifest_url)
    m = artifacts.load_manifest(url)
    root = artifacts.artifact_root(url)
    rels = sorted(f.path for f in m.files if SHARD_RE.search(f.path))
    if not rels:
        raise artifacts.ManifestError(f"dataset manifest {url} lists no shards/*.tar files")
    sizes = m.metrics.get("shard_samples") or {}
    sizes_url = storage.join(root, "sizes.json")
    if not sizes and storage.exists(sizes_url):
        sizes = json.loads(storage.read_text(sizes_url))
    out = []
    for rel in rels:
        shard_url = artifacts.resolve(root, rel)
        if rel not in sizes:
            warnings.warn(f"{shard_url}: no sample count in sizes.json; counting by reading the shard", stacklevel=2)
        out.append(Shard(shard_url, int(sizes[rel]) if rel in sizes else count_samples(shard_url)))
    return sorted(out, key=lambda s: s.url)


def count_samples(url: str) -> int:
    """Items (samples and unsafe markers) of one shard, by reading it: for shards no sizes.json describes.
    A damaged shard counts one more item than it yields, so its readers reach the damage and count it."""
    n = 0
    try:
        for _ in raw_samples(url):
            n += 1
    except tarsamples.BadShard:
        n += 1
    return n


def dataset_num_samples(dataset_manifest_url: str) -> int:
    """Successful samples in the dataset (manifest metrics, else sizes.json)."""
    url = artifacts.manifest_url(dataset_manifest_url)
    m = artifacts.load_manifest(url)
    n = m.metrics.get("num_samples")
    if n is None:
        sizes = json.loads(storage.read_text(storage.join(artifacts.artifact_root(url), "sizes.json")))
        n = sum(int(v) for v in sizes.values())
    return int(n)


# ------------------------------------------------------------------------------------------ captions
def choose_caption(sample: dict, mode: str, rng: np.random.Generator) -> str | None:
    """The training caption, as the reference chooses it (SPEC §1, §9.1), or None to skip the sample.

    YFCC-style samples (json with `title`/`description`): 'reference' picks one of the two 50/50 even if
    empty (SLIP); 'strict' (our default) picks 50/50 among the non-empty ones and skips the sample if both
    are empty. Samples with a `captions` list (CC-style) get one at random; others use the `.txt` caption.
    """
    meta = sample.get("json") or {}
    if "title" in meta or "description" in meta:
        options = [str(meta.get("title") or ""), str(meta.get("description") or "")]
        pick = int(rng.integers(2))
        if mode == "reference":
            return options[pick]
        if mode != "strict":
            raise ValueError(f"caption_mode must be 'strict' or 'reference', not {mode!r}")
        options = [o for o in (options[pick], options[1 - pick]) if o.strip()]
        return options[0] if options else None
    caps = [c for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    if caps:
        return caps[int(rng.integers(len(caps)))]
    txt = sample.get("txt") or ""
    return txt if txt.strip() else None


# ------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class LoaderConfig:
    views: tuple[str, ...] = ("image", "aug1", "aug2")
    text: bool = True  # tokenised captions (the kind's TrainSpec reads text); False: samples need no caption
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    caption_mode: str = "strict"  # "strict" (skip empty captions) | "reference" (SLIP 50/50 incl. empty)
    context_length: int = 77
    force_eot: bool = False
    num_workers: int = 0  # upper bound; the layout uses a divisor of the rank's stream count
    shuffle_chunk: int = 1000  # shuffle buffer per stream (memory: chunk × encoded sample size)
    shuffle_shards: int = 4  # shards interleaved into one stream's buffer
    resampled: bool = False
    prefetch_factor: int = 2
    uint8: bool = True  # views as uint8 CHW; the trainer normalises on its device (augment.normalize_uint8_batch)
    keys: bool = False  # batches carry "__keys__": the sample keys (samples.jsonl)


def sample_rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def raw_samples(url: str, skip: int = 0) -> Iterator[dict]:
    """Raw samples {'__key__', 'jpg': bytes, 'txt': bytes, 'json': bytes, ...} of one tar from item `skip` on;
    an unsafe member is a {'__unsafe__': reason} item of its own. Raises tarsamples.BadShard at damage."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as f:
        yield from tarsamples.iter_samples(f, url, skip=skip)


def prepare_sample(raw: dict, cfg: LoaderConfig, rng: np.random.Generator, counts: dict) -> dict | None:
    """Caption + decoded views of one raw sample, or None (and a counter) when it cannot be used."""
    if "__unsafe__" in raw:
        counts["unsafe_member"] += 1
        return None
    item = {"__key__": raw.get("__key__")}
    if cfg.text:
        try:
            meta = json.loads(raw["json"]) if raw.get("json") else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
        txt = raw.get("txt")
        caption = choose_caption({"json": meta, "txt": txt.decode("utf-8", "replace") if txt else ""},
                                 cfg.caption_mode, rng)
        if caption is None:
            counts["no_caption"] += 1
            return None
        item["caption"] = caption
    data = raw.get("jpg") or raw.get("jpeg") or raw.get("png") or raw.get("webp")
    if data is None:
        counts["corrupt"] += 1
        return None
    try:
        arr = decode_image(data, cfg.aug.max_pixels, cfg.aug.image_size if cfg.aug.draft else 0)
    except BadImage as e:
        counts[e.reason] += 1
        return None
    item.update(make_views(arr, cfg.views, cfg.aug, rng, uint8=cfg.uint8))
    counts["ok"] += 1
    return item


def collate(items: list[dict], cfg: LoaderConfig) -> dict:
    batch = {v: torch.stack([it[v] for it in items]) for v in cfg.views}
    if cfg.text:
        batch["text"] = tokenize([it["caption"] for it in items], cfg.context_length, cfg.force_eot)
    if cfg.keys:
        batch["__keys__"] = [str(it["__key__"]) for it in items]
    return batch


# ------------------------------------------------------------------------------------------ stream reading
@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first item (samples and unsafe markers, tar order) of the shard in this segment
    stop: int  # one past the last

    @property
    def claimed(self) -> int:
        return self.stop - self.start


class SegmentReader:
    """Items of one segment, one per call; None once the shard ends early (counted once as bad_tar)."""

    def __init__(self, seg: Segment, skip: int, counts: dict):
        self.seg, self.left, self.counts = seg, seg.claimed - skip, counts
        self.it = raw_samples(seg.url, seg.start + skip) if self.left > 0 else None

    def next(self) -> dict | None:
        if self.it is None or self.left <= 0:
            return None
        self.left -= 1
        try:
            return next(self.it)
        except StopIteration:
            self.close()
        except Exception:  # truncated / unreadable tar: count it, keep what was read
            self.counts["bad_tar"] += 1
            self.close()
        return None

    def close(self) -> None:
        if self.it is not None:
            self.it.close()
            self.it = None


def block_samples(segments: list[Segment], key: tuple[int, ...], start: int, chunk: int,
                  counts: dict) -> Iterator[tuple[int, dict]]:
    """(index, raw sample) of one block from index `start` on: the segments' items drawn in a random
    interleave fixed by their claimed counts, each run of `chunk` draws permuted. Holes (a shard shorter than
    claimed) keep their index and yield nothing, so the order never depends on what was read."""
    order = np.repeat(np.arange(len(segments)), [s.claimed for s in segments])
    sample_rng(*key, 1).shuffle(order)
    first = start // chunk
    skips = np.bincount(order[:first * chunk], minlength=len(segments))
    readers = [SegmentReader(s, int(k), counts) for s, k in zip(segments, skips)]
    try:
        for c in range(first, -(-len(order) // chunk)):
            raws = [readers[i].next() for i in order[c * chunk:(c + 1) * chunk]]
            for j, p in enumerate(sample_rng(*key, c, 2).permutation(len(raws))):
                index = c * chunk + j
                if index >= start and raws[p] is not None:
                    yield index, raws[p]
    finally:
        for r in readers:
            r.close()


class EpochStreams:
    """Which segments each stream of an epoch reads (full pass: ranges of the epoch's permuted sample
    sequence; resampled: shards drawn with replacement), grouped into blocks of `shuffle_shards`."""

    def __init__(self, shards: list[Shard], cfg: LoaderConfig, epoch: int, streams: int):
        self.shards, self.cfg, self.epoch, self.streams = shards, cfg, epoch, streams
        if not shards:
            raise ValueError("no shards to read")
        if not cfg.resampled:
            order = sample_rng(cfg.seed, epoch, EPOCH_ORDER_KEY).permutation(len(shards))
            self.order = [shards[i] for i in order if shards[i].samples > 0]
            self.ends = np.cumsum([s.samples for s in self.order])
            self.per_stream = int(self.ends[-1]) // streams if len(self.order) else 0

    def full_pass_segments(self, stream: int) -> list[Segment]:
        lo, hi = stream * self.per_stream, (stream + 1) * self.per_stream
        out = []
        i = int(np.searchsorted(self.ends, lo, side="right"))
        while i < len(self.order) and hi > lo:
            begin = int(self.ends[i]) - self.order[i].samples
            take = min(hi, int(self.ends[i])) - lo
            out.append(Segment(self.order[i].url, lo - begin, lo - begin + take))
            lo, i = lo + take, i + 1
        return out

    def block(self, stream: int, block: int) -> list[Segment] | None:
        """The segments of block `block` of a stream's lap; None past the end of a full-pass range."""
        g = self.cfg.shuffle_shards
        if self.cfg.resampled:
            picks = [int(sample_rng(self.cfg.seed, self.epoch, stream, k, 0).integers(len(self.shards)))
                     for k in range(block * g, (block + 1) * g)]
            return [Segment(self.shards[i].url, 0, self.shards[i].samples) for i in picks]
        segs = self.full_pass_segments(stream)[block * g:(block + 1) * g]
        return segs or None


def stream_items(plan: EpochStreams, stream: int, pos: dict) -> Iterator[tuple[dict, dict]]:
    """(prepared item, position after it) of one stream, endlessly (full passes lap over their range)."""
    cfg = plan.cfg
    lap, block, index = int(pos.get("lap", 0)), int(pos.get("block", 0)), int(pos.get("index", 0))
    counts = {k: int(pos.get("counts", {}).get(k, 0)) for k in COUNTERS}
    empty = 0
    while True:
        segments = plan.block(stream, block)
        if segments is None:
            if block == 0:
                raise ValueError(f"stream {stream} of epoch {plan.epoch} has no samples (dataset smaller than "
                                 f"{plan.streams} streams?)")
            lap, block, index = lap + 1, 0, 0
            continue
        key = (cfg.seed, plan.epoch, stream, lap, block)
        got = 0
        for i, raw in block_samples(segments, key, index, cfg.shuffle_chunk, counts):
            item = prepare_sample(raw, cfg, sample_rng(*key, i, 3), counts)
            if item is None:
                continue
            got += 1
            counts["padded"] += lap > 0
            yield item, {"lap": lap, "block": block, "index": i + 1, "counts": dict(counts)}
        empty = 0 if got else empty + 1
        if empty > 2 * len(plan.shards) + 8:
            raise RuntimeError(f"no usable samples in {empty} consecutive blocks of stream {stream} (counts {counts})")
        block, index = block + 1, 0


# ------------------------------------------------------------------------------------------ one rank's epoch
@dataclass(frozen=True)
class StreamLayout:
    """How one rank reads: S streams in all, G/S samples of each per step, this rank's share of them and
    its worker count, and the micro-batches a step is cut into (slip_core.train_config.BatchPlan)."""
    streams: int
    per_stream: int
    micro: int
    accum: int
    rank: int = 0
    world: int = 1
    workers: int = 0

    def __post_init__(self):
        m = self.streams // self.world
        if self.streams % self.world or self.micro * self.accum != m * self.per_stream:
            raise ValueError(f"inconsistent stream layout {self}")
        if self.workers and m % self.workers:
            raise ValueError(f"{self.workers} workers do not divide {m} streams per rank")

    @property
    def rank_streams(self) -> list[int]:
        m = self.streams // self.world
        return list(range(self.rank * m, (self.rank + 1) * m))


class RankStreams(IterableDataset):
    """Per step, one item per worker: {stream id: {"batch": collated G/S samples, "pos": position after}}."""

    def __init__(self, shards: list[Shard], cfg: LoaderConfig, layout: StreamLayout, epoch: int, positions: dict):
        super().__init__()
        self.shards, self.cfg, self.layout, self.epoch, self.positions = shards, cfg, layout, epoch, positions

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        plan = EpochStreams(self.shards, self.cfg, self.epoch, self.layout.streams)
        mine = self.layout.rank_streams[w::n]
        gens = {s: stream_items(plan, s, self.positions.get(str(s), {})) for s in mine}
        while True:
            out = {}
            for s in mine:
                items, pos = [], None
                for _ in range(self.layout.per_stream):
                    item, pos = next(gens[s])
                    items.append(item)
                out[str(s)] = {"batch": collate(items, self.cfg), "pos": pos}
            yield out


class EpochLoader:
    """One epoch of `num_steps` optimizer steps for one rank: yields, per step, the list of `accum`
    micro-batches of `micro` samples. `state`: a global position (merge_states) or None for the epoch start."""

    def __init__(self, shards: list[Shard], cfg: LoaderConfig, layout: StreamLayout, *, epoch: int,
                 num_steps: int, state: dict | None = None):
        self.shards, self.cfg, self.layout, self.epoch, self.num_steps = shards, cfg, layout, epoch, num_steps
        state = state if state and int(state.get("epoch", -1)) == epoch else {}
        if state and int(state.get("streams", 0)) != layout.streams:
            raise ValueError(f"loader position has {state.get('streams')} streams, this run {layout.streams}")
        self.steps_done = int(state.get("steps_done", 0))
        positions = state.get("positions") or {}
        self.positions = {str(s): dict(positions[str(s)]) for s in layout.rank_streams if str(s) in positions}
        if state and len(self.positions) != len(layout.rank_streams):
            raise ValueError(f"loader position lacks streams of rank {layout.rank}")

    def state_dict(self) -> dict:
        """This rank's part of the position; merge_states() joins every rank's into the global one."""
        return {"epoch": self.epoch, "steps_done": self.steps_done, "streams": self.layout.streams,
                "positions": {k: dict(v) for k, v in self.positions.items()}}

    def counts(self) -> dict:
        total = dict.fromkeys(COUNTERS, 0)
        for p in self.positions.values():
            for k, v in p.get("counts", {}).items():
                total[k] += int(v)
        return total

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[dict]]:
        if self.steps_done >= self.num_steps:
            return
        ds = RankStreams(self.shards, self.cfg, self.layout, self.epoch, self.positions)
        kwargs = dict(num_workers=self.layout.workers)
        if self.layout.workers:
            kwargs.update(prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                          worker_init_fn=ignore_stop_signals)
        # An explicit generator: creating the loader must not consume the global torch RNG (exact resume).
        it = iter(DataLoader(ds, batch_size=None, generator=torch.Generator().manual_seed(0), **kwargs))
        try:
            while self.steps_done < self.num_steps:
                parts = {}
                for _ in range(max(1, self.layout.workers)):
                    parts.update(next(it))
                for sid, part in parts.items():
                    self.positions[sid] = part["pos"]
                self.steps_done += 1
                yield self._micro_batches([parts[str(s)]["batch"] for s in self.layout.rank_streams])
        finally:
            del it  # shuts the workers down

    def _micro_batches(self, chunks: list[dict]) -> list[dict]:
        step = {}
        for k in chunks[0]:
            step[k] = sum((c[k] for c in chunks), []) if k == "__keys__" else torch.cat([c[k] for c in chunks])
        m = self.layout.micro
        return [{k: v[i * m:(i + 1) * m] for k, v in step.items()} for i in range(self.layout.accum)]


def merge_states(parts: list[dict]) -> dict:
    """Every rank's EpochLoader.state_dict() -> the global, rank-independent position."""
    head = {k: parts[0][k] for k in ("epoch", "steps_done", "streams")}
    if any({k: p[k] for k in head} != head for p in parts):
        raise ValueError(f"ranks disagree on the data position: {[{k: p[k] for k in head} for p in parts]}")
    positions = {}
    for p in parts:
        positions.update(p["positions"])
    return {**head, "positions": positions}


def ignore_stop_signals(_: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1 sent to the whole process group: the trainer handles them (checkpoint
    at the next step boundary), and workers exit with their parent anyway (torch's parent watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
