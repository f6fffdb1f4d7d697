"""Run under `torchrun --nproc_per_node=2` (gloo, CPU; SLIP_DIST_BACKEND=nccl: NCCL, one GPU per rank, as
bench/gpu_check.sh does): DDP + slip_core losses vs an independent full-batch computation of the reference
semantics (SPEC §4, §9.3). Rank 0 writes the results of both ranks as JSON to argv[1]."""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from slip_core.registry import build_loss, build_model
from slip_core.tokenizer import tokenize

B = 4  # per-rank batch
TAU, SSL_SCALE = 0.1, 1.0


def ref_clip_rank(u, v, scale, r, detach_keys):
    """Rank r's reference CLIP loss: its rows are queries, all N rows are keys (constants if detach_keys)."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    ku, kv = (u.detach(), v.detach()) if detach_keys else (u, v)
    rows = slice(r * B, (r + 1) * B)
    labels = torch.arange(B, device=u.device) + r * B
    return (F.cross_entropy(scale * u[rows] @ kv.t(), labels) + F.cross_entropy(scale * v[rows] @ ku.t(), labels)) / 2


def ref_ntxent_rank(a, b, r):
    """Rank r's NT-Xent: anchors = its rows of both views; candidates = the other view (positive at i) and the
    same view with the anchor itself REMOVED (rather than masked)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n, losses = a.shape[0], []
    for q_all, same, cross in ((a, a, b), (b, b, a)):
        for i in range(r * B, (r + 1) * B):
            keep = torch.arange(n, device=a.device) != i
            logits = torch.cat([q_all[i] @ cross.t(), q_all[i] @ same[keep].t()]) / TAU
            losses.append(torch.logsumexp(logits, 0) - logits[i])
    return torch.stack(losses).mean()  # mean over both views' anchors == (loss_a + loss_b) / 2


def plain_bn_copy(model):
    """Same weights, but plain BatchNorm1d in the SimCLR head (a single process sees the whole batch)."""
    ref = copy.deepcopy(model)
    for name in ("bn1", "bn2"):
        old = getattr(ref.image_mlp, name)
        new = nn.BatchNorm1d(old.num_features, eps=old.eps, momentum=old.momentum).to(old.weight)
        new.load_state_dict(old.state_dict())
        setattr(ref.image_mlp, name, new)
    return ref


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    backend = os.environ.get("SLIP_DIST_BACKEND", "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(123)  # identical full batch on every rank
    n = B * world
    # float64 end to end, so the comparison measures semantics, not fp32 summation order
    img, aug1, aug2 = (torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    txt = tokenize([f"a photo of item {i} " + "word " * (i * 11) for i in range(n)]).to(device)  # some rows cut
    mine = slice(rank * B, (rank + 1) * B)
    result = {"world": world, "backend": backend}
    for mode in ("reference", "gather_with_grad"):
        torch.manual_seed(0)  # identical init on every rank
        model = build_model("SLIP_VIT_TINY", vision_depth=2, transformer_layers=2, ssl_mlp_dim=64,
                            ssl_emb_dim=32).double().to(device)
        ref = plain_bn_copy(model)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        loss_fn = build_loss("slip", ssl_scale=SSL_SCALE, ssl_temp=TAU, clip_gather_with_grad=(mode != "reference"))
        out = loss_fn(ddp(img[mine], txt[mine], aug1[mine], aug2[mine]))
        out["loss"].backward()
        losses = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(losses, torch.stack([out["loss"].detach(), out["clip_loss"], out["ssl_loss"]]))
        no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
        # -------- independent expectation: one process, full batch
        o = ref(img, txt, aug1, aug2)
        per_rank, total = [], 0.0
        for r in range(world):
            c = ref_clip_rank(o["image_embed"], o["text_embed"], o["logit_scale"], r, detach_keys=(mode == "reference"))
            s = ref_ntxent_rank(o["aug1_embed"], o["aug2_embed"], r)
            per_rank.append([(c + SSL_SCALE * s).item(), c.item(), s.item()])
            total = total + (c + SSL_SCALE * s) / world  # DDP averages the per-rank gradients
        total.backward()
        want = {k: p.grad for k, p in ref.named_parameters()}
        # full-batch (single-process CLIP) gradient, to show whether this mode equals it
        full = plain_bn_copy(model)
        full.zero_grad()
        fo = full(img, txt, aug1, aug2)
        sum((ref_clip_rank(fo["image_embed"], fo["text_embed"], fo["logit_scale"], r, False)
             + SSL_SCALE * ref_ntxent_rank(fo["aug1_embed"], fo["aug2_embed"], r)) / world for r in range(world)).backward()
        full_grads = {k: p.grad for k, p in full.named_parameters()}
        result[mode] = {
            "loss_diff": max(abs(a - b) for r in range(world) for a, b in zip(losses[r].tolist(), per_rank[r])),
            "grad_diff": max((got[k] - want[k]).abs().max().item() for k in want),
            "grad_diff_vs_full_batch": max((got[k] - full_grads[k]).abs().max().item() for k in want),
            "grad_scale": max(want[k].abs().max().item() for k in want),
            "bn_running_mean_diff": (model.image_mlp.bn1.running_mean - ref.image_mlp.bn1.running_mean).abs().max().item(),
            "params_without_grad": no_grad,
            "n_params": len(got),
            "losses": [x.tolist() for x in losses],
        }
    # every rank must agree on the averaged gradients (DDP), checked via the result of rank 1 as well
    blobs = [None] * world
    dist.all_gather_object(blobs, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(blobs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
