"""Streaming loader on real webdataset shards: views, captions, skip counters, full passes split over streams,
ranks and workers, the cross-shard shuffle buffer, exact resume and world-size independence (elastic resume)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from slip_core import data as D
from slip_core import tarsamples
from slip_core.augment import AugmentConfig, normalize_uint8_batch
from slip_core.tokenizer import EOT_ID, SOT_ID, decode
from tests._train_util import fashion_samples, jpeg_bytes, photo_samples, write_dataset

AUG = AugmentConfig(image_size=32)


@pytest.fixture(scope="module")
def clean_ds(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("clean"))
    return write_dataset(root, fashion_samples(160, seed=1) + photo_samples(short_side=128), per_shard=30)


@pytest.fixture(scope="module")
def dirty_ds(tmp_path_factory) -> str:
    """Two shards of good samples plus planted failures: garbage bytes, a truncated JPEG, a huge image,
    a sample with no caption at all, a sample without an image, a `../` sample, and a third shard that is a
    truncated tar."""
    root = str(tmp_path_factory.mktemp("dirty"))
    good = fashion_samples(40, seed=2)
    big = jpeg_bytes(Image.new("RGB", (3000, 2000), (120, 30, 200)))
    trunc = good[0][0][: len(good[0][0]) // 3]
    meta_empty = json.dumps({"title": "", "description": "  "}).encode()
    bad = {0: [("bad00001", {"jpg": b"not a jpeg", "txt": b"garbage bytes",
                             "json": json.dumps({"title": "x", "description": ""}).encode()}),
               ("bad00002", {"jpg": trunc, "txt": b"truncated", "json": json.dumps({"title": "t"}).encode()}),
               ("bad00003", {"jpg": big, "txt": b"big", "json": json.dumps({"title": "big one"}).encode()})],
           1: [("bad00004", {"jpg": good[1][0], "txt": b"", "json": meta_empty}),
               ("bad00005", {"txt": b"no image", "json": json.dumps({"title": "no image"}).encode()}),
               ("../bad00006", {"jpg": good[2][0], "txt": b"path traversal"})]}  # unsafe member names
    url = write_dataset(root, good, per_shard=20, extra_bad=bad)
    # A third shard cut in the middle of a member, as a crashed writer/partial upload leaves it.
    with open(os.path.join(root, "shards/00000.tar"), "rb") as f:
        blob = f.read()
    with open(os.path.join(root, "shards/00002.tar"), "wb") as f:
        f.write(blob[: len(blob) // 2 + 100])
    m = D.artifacts.load_manifest(url)
    m.files.append(D.artifacts.FileEntry("shards/00002.tar", "x", 0))
    # sizes.json as a reader of these shards would write it: every item (the planted ones too); the cut shard
    # is left out, so the loader counts it (one item beyond its damage, so reading reaches the damage)
    sizes = {f"shards/{i:05d}.tar": D.count_samples(os.path.join(root, f"shards/{i:05d}.tar")) for i in range(2)}
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return D.artifacts.publish(m, root)


def _cfg(**kw) -> D.LoaderConfig:
    return D.LoaderConfig(**{"aug": AUG, "shuffle_chunk": 16, "keys": True, **kw})


def _layout(batch=8, streams=4, world=1, rank=0, workers=0, accum=1) -> D.StreamLayout:
    """`batch` samples per rank per step (global batch × world)."""
    return D.StreamLayout(streams=streams, per_stream=batch * world // streams, micro=batch // accum, accum=accum,
                          rank=rank, world=world, workers=workers)


def _loader(ds, steps, cfg=None, layout=None, epoch=0, state=None) -> D.EpochLoader:
    return D.EpochLoader(D.dataset_shards(ds), cfg or _cfg(), layout or _layout(), epoch=epoch, num_steps=steps,
                         state=state)


def _collect(loader) -> list[dict]:
    """One micro-batch dict per step (accum = 1) with tensors cloned."""
    out = []
    for micro in loader:
        assert len(micro) == loader.layout.accum
        out.append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in micro[0].items()})
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all((torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k])
                                    for x, y in zip(a, b) for k in x)


def test_manifest_helpers(clean_ds):
    shards = D.dataset_shards(clean_ds)
    assert [s.url.rsplit("/", 1)[1] for s in shards] == [f"{i:05d}.tar" for i in range(6)]
    assert [s.samples for s in shards] == [30] * 6 and D.dataset_num_samples(clean_ds) == 180
    assert D.shard_urls(clean_ds) == [s.url for s in shards]


def test_choose_caption_modes():
    rng = np.random.default_rng(0)
    yfcc = {"json": {"title": "a red bike", "description": ""}, "txt": "ignored"}
    ref = [D.choose_caption(yfcc, "reference", rng) for _ in range(400)]
    assert 0.4 < ref.count("") / 400 < 0.6 and set(ref) == {"", "a red bike"}  # SLIP: empty kept
    assert {D.choose_caption(yfcc, "strict", rng) for _ in range(50)} == {"a red bike"}
    both = {"json": {"title": "t", "description": "d"}}
    picks = [D.choose_caption(both, "strict", rng) for _ in range(400)]
    assert 0.4 < picks.count("t") / 400 < 0.6
    assert D.choose_caption({"json": {"title": " ", "description": ""}}, "strict", rng) is None
    assert D.choose_caption({"json": {}, "txt": "a cat"}, "strict", rng) == "a cat"
    assert D.choose_caption({"json": {"captions": ["", "one"]}}, "strict", rng) == "one"
    assert D.choose_caption({"json": {}, "txt": ""}, "strict", rng) is None
    with pytest.raises(ValueError):
        D.choose_caption(yfcc, "bogus", rng)


def test_tar_skip_reads_no_data_and_equals_slicing(clean_ds, dirty_ds):
    for url in D.shard_urls(clean_ds)[:1] + D.shard_urls(dirty_ds)[:2]:
        full = list(D.raw_samples(url))
        for k in (0, 1, 7, len(full) - 1, len(full), len(full) + 3):
            assert list(D.raw_samples(url, skip=k)) == full[k:]
    with open(D.shard_urls(dirty_ds)[2], "rb") as f:  # damage is still found past a skip
        with pytest.raises(tarsamples.BadShard):
            list(tarsamples.iter_samples(f, "cut", skip=3))


def test_batches_views_and_tokens(clean_ds):
    loader = _loader(clean_ds, 5)
    batches = _collect(loader)
    assert len(batches) == 5 and loader.steps_done == 5
    b = batches[0]
    assert set(b) == {"image", "aug1", "aug2", "text", "__keys__"}
    assert b["image"].shape == b["aug1"].shape == (8, 3, 32, 32) and b["text"].shape == (8, 77)
    assert b["image"].dtype == torch.uint8  # normalised on the trainer's device
    as_float = next(iter(_loader(clean_ds, 1, _cfg(uint8=False))))[0]
    for v in ("image", "aug1", "aug2"):
        assert as_float[v].dtype == torch.float32
        assert torch.allclose(normalize_uint8_batch(b[v]), as_float[v], atol=1e-5)  # same views either way
    assert (b["text"][:, 0] == SOT_ID).all() and (b["text"] == EOT_ID).sum() == 8
    captions = {decode(t) for bb in batches for t in bb["text"]}
    assert captions and all(c.strip() for c in captions)  # strict mode: never an empty caption
    assert loader.counts()["ok"] == 40
    # SimCLR loader: no text needed, none produced; accumulation cuts a step into micro-batches
    only_ssl = next(iter(_loader(clean_ds, 1, _cfg(views=("aug1", "aug2"), text=False), _layout(accum=2))))
    assert len(only_ssl) == 2 and set(only_ssl[0]) == {"aug1", "aug2", "__keys__"}
    assert only_ssl[0]["aug1"].shape[0] == 4 and not set(only_ssl[0]["__keys__"]) & set(only_ssl[1]["__keys__"])


def test_bad_samples_are_skipped_and_counted(dirty_ds):
    shards = D.dataset_shards(dirty_ds)
    assert len(shards) == 3
    cfg = _cfg(aug=AugmentConfig(image_size=32, max_pixels=4_000_000))
    loader = D.EpochLoader(shards, cfg, _layout(batch=4, streams=1), epoch=0, num_steps=30)
    assert len(_collect(loader)) == 30  # never crashes: streams lap over their ranges (counted as padded)
    c = loader.counts()
    assert c["corrupt"] >= 3  # garbage bytes, truncated JPEG, sample without an image
    assert c["too_large"] >= 1 and c["no_caption"] >= 1 and c["bad_tar"] >= 1 and c["unsafe_member"] >= 2
    assert c["ok"] == 30 * 4 and c["padded"] > 0


def test_full_pass_uses_each_sample_once_across_ranks_and_workers(clean_ds):
    """180 samples, 8 streams of 22 (4 left over), 2 per stream per step: 11 steps use 176 distinct samples;
    fewer shards (6) than streams is fine, streams start mid-shard."""
    seen, per_step = [], {}
    for rank in range(2):
        layout = _layout(batch=8, streams=8, world=2, rank=rank, workers=2)
        for step, b in enumerate(_collect(_loader(clean_ds, 11, layout=layout))):
            seen += b["__keys__"]
            per_step.setdefault(step, []).extend(b["__keys__"])
    assert len(seen) == len(set(seen)) == 176
    assert len({k[:5] for k in per_step[0]}) >= 4  # one step mixes shards


def test_shuffle_buffer_mixes_across_shards(tmp_path):
    """Shards sorted by class (as a table sorted by user gives): a stream reading one shard at a time yields
    runs of one shard; the cross-shard buffer interleaves `shuffle_shards` of them."""
    samples = sorted(fashion_samples(160, seed=4), key=lambda s: s[3])
    ds = write_dataset(str(tmp_path), samples, per_shard=20)

    def same_shard_neighbours(shuffle_shards: int) -> float:
        cfg = _cfg(shuffle_shards=shuffle_shards, shuffle_chunk=40, views=("aug1",), text=False)
        keys = [k for b in _collect(_loader(ds, 20, cfg, _layout(batch=8, streams=1))) for k in b["__keys__"]]
        return float(np.mean([a[:5] == b[:5] for a, b in zip(keys, keys[1:])]))

    one, four = same_shard_neighbours(1), same_shard_neighbours(4)
    print(f"\nadjacent samples from the same shard: {one:.2f} reading 1 shard, {four:.2f} interleaving 4")
    assert one > 0.9 and four < 0.45


@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_exact_resume_from_any_step(clean_ds, workers, resampled):
    layout, cfg = _layout(workers=workers), _cfg(resampled=resampled)
    full = _collect(_loader(clean_ds, 9, cfg, layout))
    for cut in (3, 4):
        first = _loader(clean_ds, 9, cfg, layout)
        head = []
        for micro in first:
            head.append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in micro[0].items()})
            if len(head) == cut:
                break
        state = json.loads(json.dumps(D.merge_states([first.state_dict()])))  # JSON/checkpoint round trip
        tail = _collect(_loader(clean_ds, 9, cfg, layout, state=state))
        assert _same(head + tail, full)


@pytest.mark.parametrize("resampled", [False, True])
def test_position_is_world_size_independent(clean_ds, resampled):
    """Two ranks' steps = one rank's steps (same samples, same views), and a two-rank position resumes on one
    rank: what an elastic resume relies on."""
    cfg = _cfg(resampled=resampled)
    one = _collect(_loader(clean_ds, 6, cfg, _layout(batch=8, streams=4)))
    ranks = [_loader(clean_ds, 6, cfg, _layout(batch=4, streams=4, world=2, rank=r)) for r in range(2)]
    two = [list(zip(*[_collect(r) for r in ranks]))]
    for step, (a, b) in enumerate(two[0]):
        assert a["__keys__"] + b["__keys__"] == one[step]["__keys__"]
        assert torch.equal(torch.cat([a["aug1"], b["aug1"]]), one[step]["aug1"])
    heads = [_loader(clean_ds, 6, cfg, _layout(batch=4, streams=4, world=2, rank=r)) for r in range(2)]
    for h in heads:
        for i, _ in enumerate(h):
            if i == 1:
                break
    state = D.merge_states([h.state_dict() for h in heads])
    tail = _collect(_loader(clean_ds, 6, cfg, _layout(batch=8, streams=4), state=state))
    assert _same(tail, one[2:])
    with pytest.raises(ValueError, match="streams"):
        _loader(clean_ds, 6, cfg, _layout(batch=8, streams=8), state=state)


def test_seed_epoch_rank_change_the_stream(clean_ds):
    base = _collect(_loader(clean_ds, 2))
    assert _same(base, _collect(_loader(clean_ds, 2)))
    for other in (_loader(clean_ds, 2, epoch=1), _loader(clean_ds, 2, _cfg(seed=5)),
                  _loader(clean_ds, 2, _cfg(resampled=True)),
                  _loader(clean_ds, 2, layout=_layout(batch=4, streams=4, world=2, rank=1))):
        assert not _same(base, _collect(other))
