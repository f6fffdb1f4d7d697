"""Benchmark: SLIP 3-view loader throughput (samples/s per worker) vs the straightforward reference way.

Data: one webdataset shard of the 20 real photos of the offline corpus at their original resolution
(512-1000 px JPEGs, as a Flickr download would be), repeated to BENCH_LOADER_SAMPLES samples, 224-px views.
Ours: slip_core.data (decode once with JPEG draft decoding, OpenCV crop+resize and colour ops on the small
uint8 crop, caption choice + tokenisation, collation of uint8 views) in the main process (= one worker),
plus the consumer's normalisation of the uint8 batches (done on the GPU in training; counted here on CPU).
Baseline, same run, same tar reading and tokenisation: full PIL decode, then three separate torchvision PIL
pipelines (the reference's CLIP transform and twice its SSL transform, SPEC §5). Goal (issue 4): >= 2.0x.
Prints one JSON line.
"""
from __future__ import annotations

import io
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from slip_core import data as D  # noqa: E402
from slip_core.augment import MEAN, STD, AugmentConfig, normalize_uint8_batch  # noqa: E402
from slip_core.tokenizer import tokenize  # noqa: E402

N = int(os.environ.get("BENCH_LOADER_SAMPLES", 200))
SIZE = 224


class PILGaussianBlur:  # the reference's blur: PIL GaussianBlur with sigma ~ U(0.1, 2.0)
    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def reference_transforms():
    norm = T.Normalize(MEAN, STD)
    clip = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.5, 1.0)), T.ToTensor(), norm])
    ssl = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.08, 1.0)),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                     T.RandomApply([PILGaussianBlur()], p=0.5), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return clip, ssl


def build_shard(root: str) -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests._train_util import jpeg_bytes, write_dataset
    from datasets.offline import photo_corpus

    photos = [(jpeg_bytes(Image.open(p.path), quality=90), p.title, p.description, -1) for p in photo_corpus()]
    samples = [photos[i % len(photos)] for i in range(N)]
    return write_dataset(root, samples, per_shard=N, name="bench-loader")


def run_ours(shards: list[D.Shard]) -> float:
    cfg = D.LoaderConfig(aug=AugmentConfig(image_size=SIZE), shuffle_chunk=N, num_workers=0)
    layout = D.StreamLayout(streams=1, per_stream=10, micro=10, accum=1)
    loader = D.EpochLoader(shards, cfg, layout, epoch=0, num_steps=N // 10)
    t = time.perf_counter()
    n = 0
    for (b,) in loader:  # uint8 views are finished (normalised) by the consumer: count that cost here too
        n += b["image"].shape[0]
        for v in ("image", "aug1", "aug2"):
            normalize_uint8_batch(b[v])
    return n / (time.perf_counter() - t)


def run_baseline(shards: list[D.Shard]) -> float:
    clip_tf, ssl_tf = reference_transforms()
    t = time.perf_counter()
    n, batch = 0, []
    for raw in D.raw_samples(shards[0].url):
        img = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")  # full-size decode
        meta = json.loads(raw["json"])
        caption = random.choice([meta["title"], meta["description"]])
        batch.append((clip_tf(img), ssl_tf(img), ssl_tf(img), caption))
        if len(batch) == 10:
            torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), torch.stack([b[2] for b in batch])
            tokenize([b[3] for b in batch])
            n += len(batch)
            batch = []
    return n / (time.perf_counter() - t)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        shards = D.dataset_shards(build_shard(d))
        run_ours(shards)  # warm caches (tokenizer, imports)
        ours, base = [], []
        for _ in range(3):  # interleaved, best of 3: the box is shared, load varies between runs
            ours.append(run_ours(shards))
            base.append(run_baseline(shards))
        ours, base = max(ours), max(base)
    print(json.dumps({"name": "loader_slip_3view_224", "value": round(ours, 2), "baseline": round(base, 2),
                      "ratio": round(ours / base, 3), "unit": "samples/s/worker", "goal_ratio": 2.0,
                      "samples": N, "views": 3, "image_size": SIZE,
                      "baseline_desc": "full PIL decode + 3 torchvision PIL pipelines (reference recipe)"}))


if __name__ == "__main__":
    main()
