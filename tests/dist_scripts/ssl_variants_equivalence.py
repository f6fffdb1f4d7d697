"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): SLIP-MoCo v3 and SLIP-BYOL under DDP with
slip_core's losses and SyncBatchNorm vs an independent one-process full-batch computation (plain
BatchNorm1d, losses written out per rank below), float64. Rank 0 writes one JSON file of both ranks' results."""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from slip_core.distributed import SyncBatchNorm
from slip_core.registry import build_loss, build_model
from slip_core.tokenizer import tokenize

B = 4  # per-rank batch
TAU = 0.2
SMALL = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}


def plain_bn_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, SyncBatchNorm):
            parent = ref.get_submodule(name.rsplit(".", 1)[0])
            new = nn.BatchNorm1d(mod.num_features, eps=mod.eps, momentum=mod.momentum, affine=mod.affine).double()
            new.load_state_dict(mod.state_dict())
            new.requires_grad_(all(p.requires_grad for p in mod.parameters()))  # target BNs stay frozen
            setattr(parent, name.rsplit(".", 1)[1], new)
    return ref


def ref_clip_rank(u, v, scale, r):
    """Reference CLIP (SPEC §4): rank r's rows are queries; all rows are constant keys."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    rows, labels = slice(r * B, (r + 1) * B), torch.arange(B) + r * B
    return (F.cross_entropy(scale * u[rows] @ v.detach().t(), labels)
            + F.cross_entropy(scale * v[rows] @ u.detach().t(), labels)) / 2


def ref_moco_rank(o, r, keys=None):
    """Rank r's MoCo v3 loss written per anchor: −log softmax over all (or `keys`) target rows, × 2τ."""
    keys = keys if keys is not None else range(2 * B)
    total = 0.0
    for q, k in ((o["aug1_embed"], o["aug2_target"]), (o["aug2_embed"], o["aug1_target"])):
        q, k = F.normalize(q, dim=-1), F.normalize(k.detach(), dim=-1)
        terms = []
        for i in range(r * B, (r + 1) * B):
            logits = torch.stack([q[i] @ k[j] for j in keys]) / TAU
            terms.append(torch.logsumexp(logits, 0) - logits[list(keys).index(i)])
        total = total + torch.stack(terms).mean() * 2 * TAU
    return total


def ref_byol_rank(o, r):
    rows = slice(r * B, (r + 1) * B)
    cos = lambda p, z: (p * z).sum(-1) / (p.norm(dim=-1) * z.norm(dim=-1))  # noqa: E731
    return ((2 - 2 * cos(o["aug1_embed"][rows], o["aug2_target"][rows].detach())).mean()
            + (2 - 2 * cos(o["aug2_embed"][rows], o["aug1_target"][rows].detach())).mean())


def bn_means(model):
    return [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def run(name: str, rank: int, world: int, data) -> dict:
    img, txt, aug1, aug2 = data
    mine = slice(rank * B, (rank + 1) * B)
    torch.manual_seed(0)  # identical init on every rank
    model = build_model(name, **SMALL).double()
    ref = plain_bn_copy(model)
    ddp = DDP(model)
    out = build_loss(name)(ddp(img[mine], txt[mine], aug1[mine], aug2[mine]))
    out["loss"].backward()
    losses = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, torch.stack([out["loss"].detach(), out["clip_loss"], out["ssl_loss"]]))
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    # independent expectation: one process, the full batch; DDP averages the per-rank gradients
    o = ref(img, txt, aug1, aug2)
    ssl = ref_moco_rank if "MOCO" in name else ref_byol_rank
    per_rank, total = [], 0.0
    for r in range(world):
        c, s = ref_clip_rank(o["image_embed"], o["text_embed"], o["logit_scale"], r), ssl(o, r)
        per_rank.append([(c + s).item(), c.item(), s.item()])
        total = total + (c + s) / world
    total.backward()
    want = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    res = {
        "loss_diff": max(abs(a - b) for r in range(world) for a, b in zip(losses[r].tolist(), per_rank[r])),
        "grad_diff": max((got[k] - want[k]).abs().max().item() for k in want),
        "grad_scale": max(want[k].abs().max().item() for k in want),
        "bn_running_mean_diff": max((a - b).abs().max().item() for a, b in zip(bn_means(model), bn_means(ref))),
        "params_without_grad": no_grad, "n_params": len(got), "losses": [x.tolist() for x in losses],
    }
    if "MOCO" in name:  # keys from the other rank change the loss (they are really gathered)
        res["local_keys_loss_gap"] = abs(ref_moco_rank(o, 0, keys=range(B)).item() - per_rank[0][2])
    # an SGD step on the averaged gradients, then the EMA hook: every rank's target stays identical
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    model.after_optimizer_step(0.25)
    flat = torch.cat([p.flatten() for p in model.target_visual.parameters()] + [p.flatten() for p in model.target_mlp.parameters()])
    ref0 = flat.clone()
    dist.broadcast(ref0, 0)
    res["target_vs_rank0"] = (flat - ref0).abs().max().item()
    online = torch.cat([p.flatten() for p in model.visual.parameters()])
    res["target_moved"] = (flat[:online.numel()] - online).abs().max().item()
    return res


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    g = torch.Generator().manual_seed(123)  # identical full batch on every rank
    n = B * world
    img, aug1, aug2 = (torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(3))
    txt = tokenize([f"a photo of item {i}" for i in range(n)])
    result = {name: run(name, rank, world, (img, txt, aug1, aug2)) for name in ("SLIP_MOCOV3_VIT_TINY", "SLIP_BYOL_VIT_TINY")}
    blobs = [None] * world
    dist.all_gather_object(blobs, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(blobs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
