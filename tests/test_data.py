"""Streaming loader on real webdataset shards: views, captions, skip counters, splitting, exact resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from slip_core import data as D
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
    return D.artifacts.publish(m, root)


def _cfg(**kw) -> D.LoaderConfig:
    return D.LoaderConfig(**{"batch_size": 8, "aug": AUG, "shuffle_chunk": 16, **kw})


def _collect(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_manifest_helpers(clean_ds):
    urls = D.shard_urls(clean_ds)
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"{i:05d}.tar" for i in range(6)]
    assert D.dataset_num_samples(clean_ds) == 180


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


def test_batches_views_and_tokens(clean_ds):
    loader = D.EpochLoader(D.shard_urls(clean_ds), _cfg(), epoch=0, num_batches=5)
    batches = _collect(loader)
    assert len(batches) == 5 and loader.batches_done == 5
    b = batches[0]
    assert set(b) == {"image", "aug1", "aug2", "text"}
    assert b["image"].shape == b["aug1"].shape == (8, 3, 32, 32) and b["text"].shape == (8, 77)
    assert b["image"].dtype == torch.uint8  # normalised on the trainer's device
    as_float = next(iter(D.EpochLoader(D.shard_urls(clean_ds), _cfg(uint8=False), epoch=0, num_batches=1)))
    for v in ("image", "aug1", "aug2"):
        assert as_float[v].dtype == torch.float32
        assert torch.allclose(normalize_uint8_batch(b[v]), as_float[v], atol=1e-5)  # same views either way
    assert (b["text"][:, 0] == SOT_ID).all() and (b["text"] == EOT_ID).sum() == 8
    captions = {decode(t) for bb in batches for t in bb["text"]}
    assert captions and all(c.strip() for c in captions)  # strict mode: never an empty caption
    assert loader.counts()["ok"] == 40
    # SimCLR loader: no text needed, none produced
    only_ssl = next(iter(D.EpochLoader(D.shard_urls(clean_ds), _cfg(views=("aug1", "aug2")), epoch=0, num_batches=1)))
    assert set(only_ssl) == {"aug1", "aug2"}


def test_bad_samples_are_skipped_and_counted(dirty_ds):
    urls = D.shard_urls(dirty_ds)
    assert len(urls) == 3
    cfg = _cfg(aug=AugmentConfig(image_size=32, max_pixels=4_000_000), resampled=False, batch_size=4)
    loader = D.EpochLoader(urls, cfg, epoch=0, num_batches=30)
    assert len(_collect(loader)) == 30  # never crashes, keeps cycling over what is readable
    c = loader.counts()
    assert c["corrupt"] >= 3  # garbage bytes, truncated JPEG, sample without an image
    assert c["too_large"] >= 1 and c["no_caption"] >= 1 and c["bad_tar"] >= 1 and c["unsafe_member"] >= 2
    assert c["ok"] == 30 * 4


def test_unresampled_split_needs_enough_shards(dirty_ds):
    urls = D.shard_urls(dirty_ds)
    with pytest.raises(ValueError, match="shards"):  # 3 shards cannot feed 2 ranks × 2 workers unresampled
        next(iter(D.ShardStream(urls, _cfg(resampled=False), 0, rank=0, world=4)))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_from_any_batch(clean_ds, workers):
    urls = D.shard_urls(clean_ds)
    cfg = _cfg(num_workers=workers)
    full = _collect(D.EpochLoader(urls, cfg, epoch=0, num_batches=9))
    for cut in (3, 4):  # resume after an odd and an even number of batches (worker rotation)
        first = D.EpochLoader(urls, cfg, epoch=0, num_batches=9)
        head = []
        for b in first:
            head.append({k: v.clone() for k, v in b.items()})
            if len(head) == cut:
                break
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON/checkpoint round trip
        tail = _collect(D.EpochLoader(urls, cfg, epoch=0, num_batches=9, state=state))
        assert _same(head + tail, full)


def test_seed_epoch_rank_change_the_stream(clean_ds):
    urls = D.shard_urls(clean_ds)
    base = _collect(D.EpochLoader(urls, _cfg(), epoch=0, num_batches=2))
    assert _same(base, _collect(D.EpochLoader(urls, _cfg(), epoch=0, num_batches=2)))
    for other in (D.EpochLoader(urls, _cfg(), epoch=1, num_batches=2),
                  D.EpochLoader(urls, _cfg(seed=5), epoch=0, num_batches=2),
                  D.EpochLoader(urls, _cfg(), epoch=0, num_batches=2, rank=1, world=2)):
        assert not _same(base, _collect(other))


def test_unresampled_split_is_disjoint_across_ranks_and_workers(clean_ds):
    urls = D.shard_urls(clean_ds)  # 6 shards = 2 ranks × 3 streams
    seen = {}
    for rank in range(2):
        ds = D.ShardStream(urls, _cfg(resampled=False), 0, rank=rank, world=2)
        for w in range(3):
            seen[(rank, w)] = {ds._shard_for_block(w, 3, b) for b in range(4)}
    flat = [u for s in seen.values() for u in s]
    assert len(flat) == len(set(flat)) == 6
