"""Losses = SPEC §4 (single process; the 2-rank semantics are in test_distributed_losses.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slip_core.losses import CLIPLoss, SIMCLRLoss, SLIPLoss
from slip_core.registry import build_loss, build_model
from slip_core.tokenizer import tokenize

torch.set_num_threads(1)


def _loop_clip(u, v, s):
    """Symmetric InfoNCE written row by row (independent of the vectorised implementation)."""
    u, v = [x / x.norm(dim=1, keepdim=True) for x in (u, v)]
    n, total = u.shape[0], 0.0
    for i in range(n):
        li = [s * float(u[i] @ v[j]) for j in range(n)]
        lt = [s * float(v[i] @ u[j]) for j in range(n)]
        total += -li[i] + math.log(sum(math.exp(x) for x in li))
        total += -lt[i] + math.log(sum(math.exp(x) for x in lt))
    return total / (2 * n)


def _loop_ntxent(a, b, tau):
    """NT-Xent: each anchor's positive is its other view; negatives are the other 2N-2 samples."""
    a, b = [x / x.norm(dim=1, keepdim=True) for x in (a, b)]
    n, total = a.shape[0], 0.0
    for q, other_same, other_cross in ((a, a, b), (b, b, a)):
        for i in range(n):
            pos = float(q[i] @ other_cross[i]) / tau
            negs = [float(q[i] @ other_cross[j]) / tau for j in range(n) if j != i]
            negs += [float(q[i] @ other_same[j]) / tau for j in range(n) if j != i]
            total += -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs))
    return total / (2 * n)


def test_clip_hand_computed():
    # orthogonal pairs, image == text, scale 1: each row's CE = log(1 + (N-1) e^-1)
    e = torch.eye(3) * torch.tensor([[2.0], [5.0], [0.5]])  # normalisation must remove the lengths
    out = CLIPLoss()({"image_embed": e, "text_embed": e.clone(), "logit_scale": torch.tensor(1.0)})
    assert out["loss"].item() == pytest.approx(math.log(1 + 2 * math.exp(-1)), rel=1e-6)
    assert out["clip_acc"].item() == 100.0 and out["clip_loss"].item() == pytest.approx(out["loss"].item())
    # swapped texts: nobody finds the right partner
    out = CLIPLoss()({"image_embed": e, "text_embed": e[[1, 2, 0]], "logit_scale": torch.tensor(1.0)})
    assert out["clip_acc"].item() == 0.0


def test_clip_matches_loop():
    torch.manual_seed(0)
    u, v = torch.randn(6, 8), torch.randn(6, 8)
    out = CLIPLoss()({"image_embed": u, "text_embed": v, "logit_scale": torch.tensor(1 / 0.07)})
    assert out["loss"].item() == pytest.approx(_loop_clip(u.double(), v.double(), 1 / 0.07), rel=1e-5)
    acc = 100 * float(((F.normalize(u) @ F.normalize(v).t()).argmax(1) == torch.arange(6)).float().mean())
    assert out["clip_acc"].item() == pytest.approx(acc)


def test_simclr_hand_computed_and_loop():
    # identical orthonormal views: logits row = [1/τ, 0.., -1e9+1/τ, 0..] → log(1 + (2N-2) e^{-1/τ})
    e = torch.eye(4)
    out = SIMCLRLoss(0.1)({"aug1_embed": e, "aug2_embed": e * 3})
    assert out["loss"].item() == pytest.approx(math.log(1 + 6 * math.exp(-10)), abs=1e-6)
    out5 = SIMCLRLoss(0.5)({"aug1_embed": e, "aug2_embed": e})
    assert out5["loss"].item() == pytest.approx(math.log(1 + 6 * math.exp(-2)), rel=1e-6)
    assert out["ssl_acc"].item() == 100.0
    torch.manual_seed(1)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    for tau in (0.1, 0.5):
        out = SIMCLRLoss(tau)({"aug1_embed": a, "aug2_embed": b})
        assert out["loss"].item() == pytest.approx(_loop_ntxent(a.double(), b.double(), tau), rel=1e-5)


def test_slip_combination_and_build_loss():
    torch.manual_seed(2)
    outs = {"image_embed": torch.randn(4, 8), "text_embed": torch.randn(4, 8), "logit_scale": torch.tensor(10.0),
            "aug1_embed": torch.randn(4, 6), "aug2_embed": torch.randn(4, 6)}
    r = SLIPLoss(ssl_scale=0.5, ssl_temp=0.2)(outs)
    assert set(r) == {"loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc"}
    clip, ssl = CLIPLoss()(outs), SIMCLRLoss(0.2)(outs)
    assert r["loss"].item() == pytest.approx(clip["loss"].item() + 0.5 * ssl["loss"].item(), rel=1e-6)
    assert set(build_loss("CLIP_VITB16")(outs)) == {"loss", "clip_loss", "clip_acc"}
    assert set(build_loss("simclr")(outs)) == {"loss", "ssl_loss", "ssl_acc"}
    assert isinstance(build_loss("SLIP_VIT_TINY"), SLIPLoss)
    assert build_loss("SLIP_VITS16", ssl_scale=2.0).ssl_scale == 2.0
    with pytest.raises(ValueError):
        build_loss("resnet50")


def test_low_precision_mask_stays_finite():
    # SPEC §9.4: 1e9 in fp16 is inf; our mask is fp32, so half-precision embeddings give a finite loss
    torch.manual_seed(3)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    ref = SIMCLRLoss()({"aug1_embed": a, "aug2_embed": b})["loss"].item()
    for dtype in (torch.float16, torch.bfloat16):
        got = SIMCLRLoss()({"aug1_embed": a.to(dtype), "aug2_embed": b.to(dtype)})["loss"].item()
        assert math.isfinite(got) and got == pytest.approx(ref, rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SIMCLRLoss()({"aug1_embed": a, "aug2_embed": b})["loss"]
    assert torch.isfinite(got) and got.item() == pytest.approx(ref, rel=5e-2)


def test_one_rank_gather_options_identical_and_every_parameter_gets_gradient():
    torch.manual_seed(4)
    model = build_model("SLIP_VIT_TINY")
    img = torch.randn(6, 3, 64, 64)
    txt = tokenize([f"a photo of thing {i}" for i in range(6)])
    grads = []
    for with_grad in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        build_loss("slip", clip_gather_with_grad=with_grad)(model(img, txt, img.flip(-1), img.flip(-2)))["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) for n in grads[0])


def test_tiny_slip_learns_a_small_batch():
    torch.manual_seed(6)
    model = build_model("SLIP_VIT_TINY")
    loss_fn = build_loss("slip")
    # no warmup here, so a small lr: at 1e-3 a fresh CLIP tower collapses in the first Adam steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # 8 structured images (random 4x4 colour layouts, upsampled): distinct at the patch level
    img = F.interpolate(torch.rand(8, 3, 4, 4), size=64, mode="nearest")
    txt = tokenize([f"a photo of a {w}" for w in "cat dog car ship bird frog tree house".split()])
    losses = []
    for _ in range(14):
        out = loss_fn(model(img, txt, img + 0.1 * torch.randn_like(img), img + 0.1 * torch.randn_like(img)))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert out["clip_acc"].item() >= 50 and out["ssl_acc"].item() >= 50


@pytest.mark.parametrize("name", ["CLIP_VIT_TINY", "SIMCLR_VIT_TINY"])
def test_every_parameter_gets_gradient_clip_and_simclr(name):
    torch.manual_seed(7)
    model = build_model(name, vision_depth=1, transformer_layers=1)
    img = torch.randn(4, 3, 64, 64)
    inputs = (img, tokenize(["a", "b c", "d e f", ""])) if name.startswith("CLIP") else (img, img.flip(-1))
    build_loss(name)(model(*inputs))["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
