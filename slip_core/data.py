"""Streaming multi-view loader over webdataset shards, with an exactly resumable position.

Stream layout. Every (epoch, rank, logical worker) owns an independent, infinite sequence of *blocks*;
block b is one shard, chosen from (seed, epoch, rank, worker, b) — with replacement (`resampled=True`,
webdataset's ResampledShards idea, no DDP end-of-epoch hangs) or as a per-epoch permutation of this
stream's disjoint share of the shards (`resampled=False`, split by node then worker). Inside a block,
samples are read in order (slip_core.tarsamples: webdataset's key grouping; unsafe members and truncated
shards flagged) and permuted in chunks of `shuffle_chunk`, with the permutation seeded from the block and
chunk. The caption choice and every augmentation parameter come from a numpy Generator seeded from
(seed, epoch, rank, worker, block, index).

So a stream position is just (block, index) plus counters: workers report it with every batch, the main
process keeps the last one per worker, and a resumed loader starts each worker at its position (skipping
raw tar members, no decoding). DataLoader hands out batches round-robin from worker 0, so a loader resumed
after k batches rotates its workers by k mod W. The length of an epoch is explicit (`samples_per_epoch`
→ batches per rank), never "until the shards run out".
"""
from __future__ import annotations

import json
import re
import signal
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
# a member that is a link/device or whose name is absolute, has '..' or a control character (tarsamples).
COUNTERS = ("ok", "corrupt", "too_large", "no_caption", "bad_tar", "unsafe_member")


# ------------------------------------------------------------------------------------------ manifests
def shard_urls(dataset_manifest_url: str) -> list[str]:
    """URLs of a dataset artifact's shards (`shards/*.tar` in its manifest), sorted: its own and, for an
    incremental version, the earlier versions' shards it references (`../<artifact>/shards/...`)."""
    url = artifacts.manifest_url(dataset_manifest_url)
    m = artifacts.load_manifest(url)
    root = artifacts.artifact_root(url)
    urls = sorted(artifacts.resolve(root, f.path) for f in m.files if SHARD_RE.search(f.path))
    if not urls:
        raise artifacts.ManifestError(f"dataset manifest {url} lists no shards/*.tar files")
    return urls


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


# ------------------------------------------------------------------------------------------ stream
@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # per device (micro-batch)
    views: tuple[str, ...] = ("image", "aug1", "aug2")
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    caption_mode: str = "strict"  # "strict" (skip empty captions) | "reference" (SLIP 50/50 incl. empty)
    context_length: int = 77
    force_eot: bool = False
    num_workers: int = 0
    shuffle_chunk: int = 1000  # samples permuted together (memory: chunk × encoded size)
    resampled: bool = True
    prefetch_factor: int = 2
    uint8: bool = True  # views as uint8 CHW; the trainer normalises on its device (augment.normalize_uint8_batch)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _open_tar(url: str):
    fs, path = storage.url_to_fs(url)
    return fs.open(path, "rb")


def _raw_samples(url: str) -> Iterator[dict]:
    """Raw samples {'__key__', 'jpg': bytes, 'txt': bytes, 'json': bytes, ...} of one tar, in order; an unsafe
    member is a {'__unsafe__': reason} sample of its own (so it has a stream index, like any other skip).
    Raises tarsamples.BadShard at a truncated/corrupt end."""
    with _open_tar(url) as f:
        yield from tarsamples.iter_samples(f, url)


class ShardStream(IterableDataset):
    """Yields collated batches for one rank; see the module docstring for the position contract."""

    def __init__(self, urls: list[str], cfg: LoaderConfig, epoch: int, rank: int, world: int,
                 positions: dict | None = None, worker_offset: int = 0):
        super().__init__()
        self.urls, self.cfg, self.epoch, self.rank, self.world = list(urls), cfg, epoch, rank, world
        self.positions = positions or {}
        self.worker_offset = worker_offset
        self.need_text = "image" in cfg.views

    # -- which shard is block b of this stream
    def _shard_for_block(self, worker: int, n_workers: int, block: int) -> str:
        c = self.cfg
        if c.resampled:
            return self.urls[int(_rng(c.seed, self.epoch, self.rank, worker, block, 0).integers(len(self.urls)))]
        streams = self.world * n_workers
        if len(self.urls) < streams:
            raise ValueError(f"{len(self.urls)} shards < world_size × num_workers = {streams}; "
                             "use resampled=True or fewer workers (ENVIRONMENT.md §3)")
        mine = self.urls[self.rank * n_workers + worker::streams]
        cycle, k = divmod(block, len(mine))
        order = _rng(c.seed, self.epoch, self.rank, worker, cycle, 1).permutation(len(mine))
        return mine[int(order[k])]

    def _block_samples(self, url: str, key: tuple[int, ...], start: int, counts: dict) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) of a block from `start`, chunk-permuted; tar errors end the block."""
        chunk, index, c = [], 0, 0

        def flush():
            nonlocal index, c
            perm = _rng(*key, c, 2).permutation(len(chunk))
            for j in perm:
                if index >= start:
                    yield index, chunk[j]
                index += 1
            chunk.clear()
            c += 1

        try:
            for s in _raw_samples(url):
                chunk.append(s)
                if len(chunk) == self.cfg.shuffle_chunk:
                    yield from flush()
        except Exception:  # truncated / unreadable tar: count it, keep what was read, move on
            counts["bad_tar"] += 1
        if chunk:
            yield from flush()

    def _prepare(self, raw: dict, rng: np.random.Generator, counts: dict) -> dict | None:
        c = self.cfg
        if "__unsafe__" in raw:
            counts["unsafe_member"] += 1
            return None
        item = {}
        if self.need_text:
            try:
                meta = json.loads(raw["json"]) if raw.get("json") else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
            txt = raw.get("txt")
            caption = choose_caption({"json": meta, "txt": txt.decode("utf-8", "replace") if txt else ""},
                                     c.caption_mode, rng)
            if caption is None:
                counts["no_caption"] += 1
                return None
            item["caption"] = caption
        data = raw.get("jpg") or raw.get("jpeg") or raw.get("png") or raw.get("webp")
        if data is None:
            counts["corrupt"] += 1
            return None
        try:
            arr = decode_image(data, c.aug.max_pixels, c.aug.image_size if c.aug.draft else 0)
        except BadImage as e:
            counts[e.reason] += 1
            return None
        item.update(make_views(arr, c.views, c.aug, rng, uint8=c.uint8))
        counts["ok"] += 1
        return item

    def _collate(self, items: list[dict], pos: dict) -> dict:
        batch = {v: torch.stack([it[v] for it in items]) for v in self.cfg.views}
        if self.need_text:
            batch["text"] = tokenize([it["caption"] for it in items], self.cfg.context_length, self.cfg.force_eot)
        batch["__pos__"] = pos
        return batch

    def __iter__(self):
        info = get_worker_info()
        phys, n_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (phys + self.worker_offset) % n_workers  # logical worker (see module docstring)
        if info is not None:
            torch.set_num_threads(1)
        pos = self.positions.get(str(worker), {})
        block, start = int(pos.get("block", 0)), int(pos.get("index", 0))
        counts = {k: int(pos.get("counts", {}).get(k, 0)) for k in COUNTERS}
        items, empty_blocks = [], 0
        while True:
            url = self._shard_for_block(worker, n_workers, block)
            key = (self.cfg.seed, self.epoch, self.rank, worker, block)
            got = 0
            for index, raw in self._block_samples(url, key, start, counts):
                item = self._prepare(raw, _rng(*key, index, 3), counts)
                if item is None:
                    continue
                got += 1
                items.append(item)
                if len(items) == self.cfg.batch_size:
                    nxt = {"worker": worker, "block": block, "index": index + 1, "counts": dict(counts)}
                    yield self._collate(items, nxt)
                    items = []
            empty_blocks = 0 if got else empty_blocks + 1
            if empty_blocks > 2 * len(self.urls) + 8:
                raise RuntimeError(f"no usable samples in {empty_blocks} consecutive shards (counts {counts})")
            block, start = block + 1, 0


class EpochLoader:
    """One epoch of `num_batches` batches for one rank, resumable from `state_dict()`."""

    def __init__(self, urls: list[str], cfg: LoaderConfig, *, epoch: int, num_batches: int,
                 rank: int = 0, world: int = 1, state: dict | None = None):
        self.urls, self.cfg, self.epoch, self.num_batches = urls, cfg, epoch, num_batches
        self.rank, self.world = rank, world
        state = state if state and int(state.get("epoch", -1)) == epoch else {}
        self.batches_done = int(state.get("batches_done", 0))
        self.positions = {str(k): v for k, v in (state.get("positions") or {}).items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": {k: dict(v) for k, v in self.positions.items()}}

    def counts(self) -> dict:
        total = dict.fromkeys(COUNTERS, 0)
        for p in self.positions.values():
            for k, v in p.get("counts", {}).items():
                total[k] += int(v)
        return total

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self.batches_done >= self.num_batches:
            return
        w = max(1, self.cfg.num_workers)
        ds = ShardStream(self.urls, self.cfg, self.epoch, self.rank, self.world,
                         self.positions, worker_offset=self.batches_done % w)
        kwargs = dict(num_workers=self.cfg.num_workers)
        if self.cfg.num_workers:
            kwargs.update(prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                          worker_init_fn=_ignore_stop_signals)
        # An explicit generator: creating the loader must not consume the global torch RNG (exact resume).
        dl = DataLoader(ds, batch_size=None, generator=torch.Generator().manual_seed(0), **kwargs)
        it = iter(dl)
        try:
            while self.batches_done < self.num_batches:
                batch = next(it)
                pos = batch.pop("__pos__")
                self.positions[str(pos["worker"])] = pos
                self.batches_done += 1
                yield batch
        finally:
            del it  # shuts the workers down


def _ignore_stop_signals(_: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1 sent to the whole process group: the trainer handles them (checkpoint
    at the next step boundary), and workers exit with their parent anyway (torch's parent watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
