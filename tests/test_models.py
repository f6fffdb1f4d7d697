"""Models = the reference dimensions, names, init and text-tower semantics (SPEC §3)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slip_core.models import CausalSelfAttention, LayerNorm, QuickGELU
from slip_core.registry import MODEL_PRESETS, build_model
from slip_core.tokenizer import EOT_ID, tokenize

torch.set_num_threads(1)

# SPEC §3 table: vision width, depth, heads per backbone; text 512/12/8, ctx 77, vocab 49408, embed 512.
SPEC_VISION = {"VITS16": (384, 12, 12), "VITB16": (768, 12, 12), "VITL16": (1024, 24, 16)}


def spec_state_dict_shapes(kind: str, vw: int, depth: int) -> dict[str, tuple]:
    """Parameter names/shapes of a released SLIP checkpoint, written out from SPEC §3 (timm ViT names)."""
    out: dict[str, tuple] = {}
    v = {"visual.cls_token": (1, 1, vw), "visual.pos_embed": (1, 197, vw),
         "visual.patch_embed.proj.weight": (vw, 3, 16, 16), "visual.patch_embed.proj.bias": (vw,),
         "visual.norm.weight": (vw,), "visual.norm.bias": (vw,)}
    for i in range(depth):
        b = f"visual.blocks.{i}."
        v.update({b + "norm1.weight": (vw,), b + "norm1.bias": (vw,), b + "attn.qkv.weight": (3 * vw, vw),
                  b + "attn.qkv.bias": (3 * vw,), b + "attn.proj.weight": (vw, vw), b + "attn.proj.bias": (vw,),
                  b + "norm2.weight": (vw,), b + "norm2.bias": (vw,), b + "mlp.fc1.weight": (4 * vw, vw),
                  b + "mlp.fc1.bias": (4 * vw,), b + "mlp.fc2.weight": (vw, 4 * vw), b + "mlp.fc2.bias": (vw,)})
    out.update(v)
    if kind in ("clip", "slip"):
        w = 512
        out.update({"token_embedding.weight": (49408, w), "positional_embedding": (77, w),
                    "ln_final.weight": (w,), "ln_final.bias": (w,), "image_projection": (vw, 512),
                    "text_projection": (w, 512), "logit_scale": ()})
        for i in range(12):
            b = f"transformer.resblocks.{i}."
            out.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                        b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                        b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "mlp.c_fc.weight": (4 * w, w),
                        b + "mlp.c_fc.bias": (4 * w,), b + "mlp.c_proj.weight": (w, 4 * w),
                        b + "mlp.c_proj.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,)})
    if kind in ("simclr", "slip"):
        out.update({"image_mlp.layer1.weight": (4096, vw), "image_mlp.layer1.bias": (4096,),
                    "image_mlp.layer2.weight": (4096, 4096), "image_mlp.layer2.bias": (4096,),
                    "image_mlp.layer3.weight": (256, 4096), "image_mlp.layer3.bias": (256,)})
        for bn in ("bn1", "bn2"):
            out.update({f"image_mlp.{bn}.{k}": (4096,) for k in ("weight", "bias", "running_mean", "running_var")})
            out[f"image_mlp.{bn}.num_batches_tracked"] = ()
    return out


def test_presets_complete_and_dims():
    for kind in ("CLIP", "SIMCLR", "SLIP"):
        for vit, (vw, depth, heads) in SPEC_VISION.items():
            c = MODEL_PRESETS[f"{kind}_{vit}"]
            assert (c.kind, c.image_size, c.patch_size) == (kind.lower(), 224, 16)
            assert (c.vision_width, c.vision_depth, c.vision_heads) == (vw, depth, heads)
            assert (c.embed_dim, c.context_length, c.vocab_size) == (512, 77, 49408)
            assert (c.transformer_width, c.transformer_layers, c.transformer_heads) == (512, 12, 8)
            assert (c.ssl_mlp_dim, c.ssl_emb_dim) == (4096, 256)
        tiny = MODEL_PRESETS[f"{kind}_VIT_TINY"]
        assert tiny.image_size == 64 and tiny.context_length == 77 and tiny.vocab_size == 49408


@pytest.mark.parametrize("name", [f"{k}_{v}" for k in ("CLIP", "SIMCLR", "SLIP") for v in SPEC_VISION])
def test_state_dict_names_and_shapes_equal_released(name):
    with torch.device("meta"):
        model = build_model(name)
    kind, vit = name.lower().split("_")[0], name.split("_")[1]
    vw, depth, heads = SPEC_VISION[vit]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_state_dict_shapes(kind, vw, depth)
    assert all(blk.attn.num_heads == heads for blk in model.visual.blocks)  # ViT-S/16: 12 heads (MoCo v3)
    assert model.visual.norm.eps == 1e-6 and model.visual.num_classes == 0


def test_parameter_counts_match_reference_notes():
    # SLIP_REFERENCE_NOTES §3.1: ViT-S ≈ 22M, B ≈ 86M, L ≈ 304M; text ≈ 63.4M; MLP ≈ 19.4/21.0/22.0M.
    expected = {"VITS16": (21.7, 19.4), "VITB16": (85.8, 21.0), "VITL16": (303.3, 22.0)}
    for vit, (vis_m, mlp_m) in expected.items():
        with torch.device("meta"):
            m = build_model(f"SLIP_{vit}")
        count = lambda prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix)) / 1e6
        assert count("visual.") == pytest.approx(vis_m, abs=0.6)
        assert count("image_mlp.") == pytest.approx(mlp_m, abs=0.1)
        text = count("transformer.") + count("token_embedding") + count("positional") + count("ln_final") + count("text_projection")
        assert text == pytest.approx(63.4, abs=0.2)


def test_reference_init_statistics():
    torch.manual_seed(0)
    m = build_model("CLIP_VITS16")
    w, L = 512, 12
    std = lambda t: t.detach().float().std().item()
    assert std(m.token_embedding.weight) == pytest.approx(0.02, rel=0.02)
    assert std(m.positional_embedding) == pytest.approx(0.01, rel=0.05)
    blk = m.transformer.resblocks[3]
    assert std(blk.attn.in_proj_weight) == pytest.approx(w ** -0.5, rel=0.02)
    assert std(blk.attn.out_proj.weight) == pytest.approx(w ** -0.5 * (2 * L) ** -0.5, rel=0.02)
    assert std(blk.mlp.c_fc.weight) == pytest.approx((2 * w) ** -0.5, rel=0.02)
    assert std(blk.mlp.c_proj.weight) == pytest.approx(w ** -0.5 * (2 * L) ** -0.5, rel=0.02)
    assert blk.attn.in_proj_bias.abs().max() == 0 and blk.attn.out_proj.bias.abs().max() == 0
    assert std(m.image_projection) == pytest.approx(384 ** -0.5, rel=0.02)
    assert std(m.text_projection) == pytest.approx(w ** -0.5, rel=0.02)
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and m.logit_scale.item() == pytest.approx(2.6593, abs=1e-4)
    # timm init on the vision tower: trunc-normal(0.02) linears with zero bias, cls/pos tokens std 0.02
    assert std(m.visual.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.05)
    assert m.visual.blocks[0].mlp.fc1.bias.abs().max() == 0
    assert std(m.visual.pos_embed) == pytest.approx(0.02, rel=0.05)
    assert std(m.visual.cls_token) == pytest.approx(0.02, rel=0.25)


def test_forward_outputs_per_kind():
    torch.manual_seed(0)
    img = torch.randn(4, 3, 64, 64)
    txt = tokenize(["a photo of a cat", "a dog", "", "x " * 100])
    slip = build_model("SLIP_VIT_TINY")
    c = slip.config
    out = slip(img, txt, img, img)
    assert set(out) == {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"}
    assert out["image_embed"].shape == out["text_embed"].shape == (4, c.embed_dim)
    assert out["aug1_embed"].shape == (4, c.ssl_emb_dim)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert slip.visual(img).shape == (4, c.vision_width)
    clip = build_model("CLIP_VIT_TINY")
    assert set(clip(img, txt)) == {"image_embed", "text_embed", "logit_scale"}
    simclr = build_model("SIMCLR_VIT_TINY")
    assert set(simclr(img, img)) == {"aug1_embed", "aug2_embed"} and not hasattr(simclr, "transformer")
    assert build_model("SLIP_VIT_TINY", ssl_mlp_dim=64).image_mlp.layer1.out_features == 64
    with pytest.raises(TypeError):
        build_model("SLIP_VIT_TINY", bogus=1)
    with pytest.raises(KeyError):
        build_model("SLIP_VITX")


def test_sdpa_equals_straightforward_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4)
    nn.init.normal_(attn.in_proj_weight, std=0.2)
    nn.init.normal_(attn.in_proj_bias, std=0.2)
    x = torch.randn(3, 77, 64, requires_grad=True)
    fast = attn(x)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, attn.in_proj_weight])
    attn.use_sdpa = False
    slow = attn(x)
    g_slow = torch.autograd.grad(slow.square().sum(), [x, attn.in_proj_weight])
    assert (fast - slow).abs().max().item() < 1e-5
    assert all((a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item()) for a, b in zip(g_fast, g_slow))
    x = x.detach()
    # and both equal torch's nn.MultiheadAttention (the reference module) with an additive causal mask,
    # sequence-first as in the reference
    mha = nn.MultiheadAttention(64, 4)
    mha.load_state_dict(attn.state_dict())
    mask = torch.full((77, 77), float("-inf")).triu(1)
    ref = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False, attn_mask=mask)[0]
    assert (fast - ref.transpose(0, 1)).abs().max().item() < 1e-5


def test_text_tower_causal_and_pools_at_argmax():
    torch.manual_seed(0)
    m = build_model("CLIP_VIT_TINY").eval()
    txt = tokenize(["a photo of a cat", "word " * 100])
    assert EOT_ID not in txt[1].tolist()  # reference truncation
    hidden = lambda t: m.ln_final(m.transformer(m.token_embedding(t) + m.positional_embedding))
    h = hidden(txt)
    # causal: changing tokens after position p leaves positions <= p unchanged
    t2 = txt.clone()
    t2[:, 10:] = 1234
    assert torch.allclose(hidden(t2)[:, :10], h[:, :10], atol=1e-6)
    assert not torch.allclose(hidden(t2)[:, 10:], h[:, 10:], atol=1e-3)
    pos = txt.argmax(-1)
    assert pos[0].item() == 6  # [SOT, a, photo, of, a, cat, EOT]
    expected = torch.stack([h[i, pos[i]] for i in range(2)]) @ m.text_projection
    assert torch.allclose(m.encode_text(txt), expected, atol=1e-6)


def test_fp32_layernorm_and_quickgelu():
    ln = LayerNorm(16)
    nn.init.normal_(ln.weight)
    x = (torch.randn(4, 16) * 100).to(torch.bfloat16)
    y = ln(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.layer_norm(x.float(), (16,), ln.weight, ln.bias, 1e-5).to(torch.bfloat16))
    z = torch.linspace(-5, 5, 101)
    assert torch.allclose(QuickGELU()(z), z * torch.sigmoid(1.702 * z))
