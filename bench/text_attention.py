"""Benchmark: text-tower step time with SDPA causal attention vs the straightforward softmax(QKᵀ+mask)V.

Reference text tower (width 512, 12 layers, 8 heads, context 77), forward + backward of the pooled,
projected embedding for BENCH_TEXT_BATCH captions on BENCH_THREADS CPU threads (or CUDA if present).
value = seconds/step with SDPA (our default), baseline = seconds/step with the straightforward attention,
ratio = value / baseline (< 1 means SDPA is faster). Both paths agree within 1e-5 (tests/test_models.py).
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slip_core.registry import build_model  # noqa: E402
from slip_core.tokenizer import tokenize  # noqa: E402

BATCH = int(os.environ.get("BENCH_TEXT_BATCH", 8))
REPEAT = int(os.environ.get("BENCH_REPEAT", 2))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model("CLIP_VITS16").to(device)
    tokens = tokenize([f"a photo of a thing number {i} " + "word " * (i % 20) for i in range(BATCH)]).to(device)

    def step_time(use_sdpa: bool) -> float:
        for blk in model.transformer.resblocks:
            blk.attn.use_sdpa = use_sdpa
        best = float("inf")
        for _ in range(REPEAT + 1):  # first run is warm-up
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.encode_text(tokens).square().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    naive = step_time(False)
    sdpa = step_time(True)
    print(json.dumps({"name": "text_tower_sdpa_step", "value": round(sdpa, 4), "baseline": round(naive, 4),
                      "ratio": round(sdpa / naive, 3), "unit": "s/step", "batch": BATCH, "device": device,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
