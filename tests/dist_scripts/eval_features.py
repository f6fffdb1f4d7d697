"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): zero-shot ("embed") and linear-probe ("visual")
features of a catalog split extracted across ranks with evaluation.common.features, for an ImageFolder split
(map-style: rank slices by index) and a CLIP_benchmark webdataset split (iterable: rank slices by shard).
Rank 0 writes the gathered arrays to OUT (npz) and asserts the other ranks got None.

usage: eval_features.py CHECKPOINT DATA_ROOT WDS_ROOT CACHE_DIR OUT
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from datasets import catalog
from evaluation import common
from slip_core.distributed import get_rank, init_from_env


def main(checkpoint: str, data_root: str, wds_root: str, cache_dir: str, out: str) -> None:
    assert init_from_env(torch.device("cpu")) and dist.get_world_size() == 2
    lm = common.load_model(checkpoint)
    arrays = {}
    for tag, root in (("folder", data_root), ("wds", wds_root)):
        for kind, tf in (("embed", common.zeroshot_transform(64)), ("visual", common.probe_eval_transform(64))):
            loaded = catalog.load("digits", "test", tf, root, max_samples=150 if tag == "folder" else None)
            for attempt in ("computed", "cached"):  # the second call takes the cache path on every rank
                x, y = common.features(lm, loaded, kind, batch_size=16, cache_dir=cache_dir)
                if get_rank() == 0:
                    arrays[f"{tag}-{kind}-{attempt}-x"], arrays[f"{tag}-{kind}-{attempt}-y"] = x, y
                else:
                    assert x is None and y is None
    if get_rank() == 0:
        np.savez(out, **arrays)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
