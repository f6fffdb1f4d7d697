"""SLIP-MoCo v3 / SLIP-BYOL / SLIP-BEiT and CLIP_RN50 (issue 9): losses by hand, BEiT masking and
tokenizers, learning on real images through the trainer's `train_step`, EMA schedule, checkpoint
round trip and exact resume, zero-shot / probe features through evaluation/, and (MoCo v3,
BYOL) 2-process gloo DDP equivalence to an independent full-batch computation."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slip_core import augment
from slip_core.checkpoint import load_checkpoint, load_state, save_checkpoint
from slip_core.mim import (PatchQuantizer, block_mask, fit_kmeans_tokenizer, patch_features, save_tokenizer)
from slip_core.open_clip_export import build_open_clip
from slip_core.registry import MODEL_PRESETS, build_loss, build_model, get_spec
from slip_core.optim import build_optimizer
from slip_core.ssl_variants import BYOLLoss, MoCoV3Loss, cosine_momentum
from slip_core.tokenizer import tokenize
from slip_core.trainer import train_step
from tests._train_util import fashion_samples

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
# small enough for ~0.1 s per step on one core; the paper presets are checked for shape only
SMALL_VIT = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}
SMALL = {"SLIP_MOCOV3_VIT_TINY": SMALL_VIT, "SLIP_BYOL_VIT_TINY": SMALL_VIT,
         "SLIP_BEIT_VIT_TINY": {**SMALL_VIT, "mim_vocab": 32},
         "CLIP_RN_TINY": {"image_size": 32, "transformer_layers": 1}}
VARIANTS = list(SMALL)


# ------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def batches():
    """Two fixed batches of 16 real Fashion-MNIST JPEGs: decoded and augmented by slip_core.augment."""
    cfg = augment.AugmentConfig(image_size=32)
    rng = np.random.default_rng(0)
    out = []
    samples = fashion_samples(32, seed=5)
    for b in range(2):
        views = {"image": [], "aug1": [], "aug2": []}
        for jpg, title, _, _ in samples[b * 16:(b + 1) * 16]:
            v = augment.make_views(augment.decode_image(jpg), ("image", "aug1", "aug2"), cfg, rng)
            for k in views:
                views[k].append(v[k])
        out.append({**{k: torch.stack(v) for k, v in views.items()},
                    "text": tokenize([s[1] for s in samples[b * 16:(b + 1) * 16]])})
    return out


def _train(model, batches, steps: int, lr: float = 2e-3) -> list[dict]:
    """`steps` optimizer steps of trainer.train_step (fp32, no scaler)."""
    opt = build_optimizer(model, lr, 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = build_loss(model.config.name)
    model.train()
    hist = []
    for s in range(steps):
        # train_step calls the spec's after_step: model.after_optimizer_step(progress) (the EMA hook)
        hist.append(train_step(model, loss_fn, opt, scaler, [batches[s % len(batches)]], spec=get_spec(model.config),
                               device=torch.device("cpu"), autocast=contextlib.nullcontext, lr=lr,
                               progress=s / steps))
    return hist


# ------------------------------------------------------------------------------------------- units
def test_presets_registered():
    for kind in ("MOCOV3", "BYOL", "BEIT"):
        b16, tiny = MODEL_PRESETS[f"SLIP_{kind}_VITB16"], MODEL_PRESETS[f"SLIP_{kind}_VIT_TINY"]
        assert b16.kind == tiny.kind == f"slip_{kind.lower()}"
        assert (b16.vision_width, b16.vision_depth, b16.image_size, b16.embed_dim) == (768, 12, 224, 512)
    assert MODEL_PRESETS["SLIP_MOCOV3_VITB16"].ema_momentum == 0.99
    assert MODEL_PRESETS["SLIP_BYOL_VITB16"].ema_momentum == 0.996
    assert MODEL_PRESETS["SLIP_BEIT_VITB16"].mim_vocab == 8192
    rn = MODEL_PRESETS["CLIP_RN50"]
    assert (rn.kind, rn.vision_layers, rn.vision_width, rn.embed_dim) == ("clip", (3, 4, 6, 3), 64, 1024)
    for kind in ("slip_mocov3", "slip_byol", "slip_beit"):  # SLIP's views and inputs, from the registry
        assert get_spec(kind).views == ("image", "aug1", "aug2") and get_spec(kind).inputs == get_spec("slip").inputs
    with torch.device("meta"):  # full-size shapes without allocating
        m = build_model("CLIP_RN50")
    assert sum(p.numel() for p in m.visual.parameters()) == 38_316_896  # open_clip RN50's image tower
    from slip_core import compute

    assert compute.vision_forward_flops(rn) == pytest.approx(12.22e9, rel=1e-3)  # convs + attention pool
    slip, moco = (compute.flops_per_sample(MODEL_PRESETS[n]) for n in ("SLIP_VITB16", "SLIP_MOCOV3_VITB16"))
    assert slip.train < moco.train < slip.train + moco.forward  # + EMA target passes, forward only


def test_moco_v3_loss_by_hand():
    tau = 0.2
    e = torch.eye(2, 4)  # two orthogonal unit rows; query i's positive key is row i
    out = MoCoV3Loss(tau)({"aug1_embed": e * 3, "aug2_embed": e, "aug1_target": e, "aug2_target": e * 5})
    # each ctr: CE over logits [1/τ, 0] = log(1 + e^{-1/τ}); times 2τ; two directions
    assert out["loss"].item() == pytest.approx(2 * 2 * tau * math.log(1 + math.exp(-1 / tau)), rel=1e-6)
    assert out["ssl_acc"].item() == 100.0
    swapped = MoCoV3Loss(tau)({"aug1_embed": e, "aug2_embed": e, "aug1_target": e.flip(0), "aug2_target": e.flip(0)})
    assert swapped["loss"].item() == pytest.approx(2 * 2 * tau * math.log(1 + math.exp(1 / tau)), rel=1e-6)
    assert swapped["ssl_acc"].item() == 0.0


def test_byol_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    same = BYOLLoss()({"aug1_embed": z, "aug2_embed": z, "aug1_target": 3 * z, "aug2_target": z})
    opposite = BYOLLoss()({"aug1_embed": z, "aug2_embed": -z, "aug1_target": z, "aug2_target": z})
    orth = BYOLLoss()({"aug1_embed": z, "aug2_embed": z, "aug1_target": z.flip(1), "aug2_target": z.flip(1)})
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert opposite["loss"].item() == pytest.approx(4.0)  # 0 + (2 - 2·(−1))
    assert orth["loss"].item() == pytest.approx(4.0)  # (2 − 0) + (2 − 0)


def test_mim_loss_and_slip_sum():
    k = 16
    loss = build_loss("slip_beit")
    out = loss({"image_embed": torch.eye(3), "text_embed": torch.eye(3), "logit_scale": torch.tensor(1.0),
                "mim_logits": torch.zeros(5, k), "mim_targets": torch.arange(5)})
    clip = math.log(2 + math.e) - 1  # logits [1, 0, 0] per row
    assert out["ssl_loss"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert out["clip_loss"].item() == pytest.approx(clip, rel=1e-6)
    assert out["loss"].item() == pytest.approx(clip + math.log(k), rel=1e-6)
    assert build_loss("slip_byol", ssl_scale=0.5).ssl_scale == 0.5
    assert build_loss("SLIP_MOCOV3_VITB16", moco_temp=0.3).ssl.tau == 0.3
    with pytest.raises(TypeError):
        build_loss("slip", moco_temp=0.3)


def test_momentum_schedule_and_ema_update():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    torch.manual_seed(0)
    m = build_model("SLIP_BYOL_VIT_TINY", **SMALL_VIT)
    assert all(torch.equal(a, b) for a, b in zip(m.visual.parameters(), m.target_visual.parameters()))
    assert not any(p.requires_grad for p in m.target_visual.parameters())
    with torch.no_grad():
        for p in m.visual.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target_visual.parameters()]
    used = m.after_optimizer_step(0.5)
    assert used == pytest.approx(0.998)
    for t0, t1, o in zip(before, m.target_visual.parameters(), m.visual.parameters()):
        torch.testing.assert_close(t1, used * t0 + (1 - used) * o)
    # targets are not optimised
    names = {id(p) for g in build_optimizer(m, 1e-3, 0.1).param_groups for p in g["params"]}
    assert not any(id(p) in names for p in m.target_visual.parameters())


def test_block_mask_is_beit_like():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(300):
        mask = block_mask(14, 14, 75, rng, min_block=16)
        counts.append(int(mask.sum()))
        assert mask.sum() <= 75
    assert np.mean(counts) > 70  # BEiT reaches (nearly) the target with few large blocks
    # blockwise, not scattered: few connected blobs, unlike a uniformly random mask of the same size
    from scipy.ndimage import label

    blobs = np.mean([label(block_mask(14, 14, 75, rng, min_block=16))[1] for _ in range(100)])
    scattered = np.mean([label(rng.permutation(196).reshape(14, 14) < 75)[1] for _ in range(100)])
    assert blobs < 4 and scattered > 15


def test_tokenizers(tmp_path):
    imgs = torch.stack([b for b in _fashion_tensors(64)])
    q = PatchQuantizer(32, patch_size=8)
    tok = q(imgs)
    assert tok.shape == (64, 16) and tok.max() < 32
    f = patch_features(imgs, 8)
    assert f.shape == (64, 16, 48)
    torch.testing.assert_close(f[0, 0].view(3, 4, 4)[:, 0, 0], imgs[0, :, 0:2, 0:2].mean(dim=(1, 2)))  # top-left 2x2
    km = fit_kmeans_tokenizer(imgs, 16, patch_size=8)
    want = (F.normalize(patch_features(imgs, 8), dim=-1) @ km.codebook.t()).argmax(-1)
    assert torch.equal(km(imgs), want) and len(km(imgs).unique()) > 8
    path = str(tmp_path / "codebook.pt")
    save_tokenizer(path, km)
    m = build_model("SLIP_BEIT_VIT_TINY", **{**SMALL["SLIP_BEIT_VIT_TINY"], "mim_vocab": 16, "mim_tokenizer": path})
    assert torch.equal(m.mim_tokenizer(imgs), km(imgs))
    with pytest.raises(FileNotFoundError):
        build_model("SLIP_BEIT_VIT_TINY", mim_tokenizer=str(tmp_path / "missing.pt"))
    # a checkpoint carries the codebook: it loads (and tokenizes the same) after the codebook file is gone
    save_checkpoint(str(tmp_path / "beit.pt"), m)
    os.remove(path)
    loaded = load_checkpoint(str(tmp_path / "beit.pt"))
    assert loaded.config.mim_tokenizer == path and torch.equal(loaded.mim_tokenizer(imgs), km(imgs))


def test_beit_masked_forward_is_timms_forward():
    torch.manual_seed(0)
    m = build_model("SLIP_BEIT_VIT_TINY", **SMALL["SLIP_BEIT_VIT_TINY"]).eval()
    x = torch.randn(3, 3, 32, 32)
    none = torch.zeros(3, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_masked(x, none), m.visual.forward_features(x)[:, 1:])
        masked = m.sample_masks(3, "cpu")
        assert masked.shape == (3, 16) and (masked.sum(1) >= 4).all()
        out = m.encode_masked(x, masked)
        # a masked patch's input is the mask token: its content does not matter, unmasked ones do
        y = x.clone()
        j = int(masked[0].nonzero()[0])
        y[0, :, (j // 4) * 8:(j // 4) * 8 + 8, (j % 4) * 8:(j % 4) * 8 + 8] += 5.0
        torch.testing.assert_close(m.encode_masked(y, masked), out)
    m.train().visual.set_grad_checkpointing(True)
    torch.manual_seed(3)
    a = m.mim(x, masked)[0]
    a.sum().backward()
    assert m.mim_mask_token.grad.abs().sum() > 0


def _fashion_tensors(n: int):
    return [augment.val_transform(augment.decode_image(jpg), 32) for jpg, *_ in fashion_samples(n, seed=9)]


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_variant_learns_on_real_images(name, batches):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name])
    hist = _train(model, batches, steps=14)
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < first - 0.1, [round(h["loss"], 3) for h in hist]
    if "ssl_loss" in hist[0]:
        s0, s1 = np.mean([h["ssl_loss"] for h in hist[:3]]), np.mean([h["ssl_loss"] for h in hist[-3:]])
        assert s1 < s0, [round(h["ssl_loss"], 3) for h in hist]
    if hasattr(model, "ema_last_momentum"):
        assert model.ema_last_momentum.item() == pytest.approx(cosine_momentum(model.config.ema_momentum, 13 / 14))


# ------------------------------------------------------------------------------------------- checkpoints + eval
@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoint_round_trip_resume_and_eval(name, batches, tmp_path):
    torch.manual_seed(1)
    model = build_model(name, **SMALL[name])
    _train(model, batches, steps=2)
    opt = build_optimizer(model, 1e-3, 0.1)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, step=2, optimizer=opt.state_dict(), rng=torch.get_rng_state())
    loaded = load_checkpoint(path)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)  # EMA targets, codebook too
    if hasattr(model, "target_visual"):
        assert any(k.startswith("target_visual.") for k in got) and got["ema_last_momentum"].item() > 0.98
    # resume: one more step from the loaded copy == one more step from the original (same RNG for BEiT masks)
    state = load_state(path)
    loaded.load_state_dict(state["state_dict"])
    for m in (model, loaded):
        torch.manual_seed(7)
        _train(m, batches[1:], steps=1)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]

    # evaluation on the checkpoint: zero-shot classifier + image embeddings, probe features, open_clip export
    from evaluation import common, zeroshot

    lm = common.load_model(path)
    classes = ["t-shirt", "trouser", "sneaker"]
    clf = zeroshot.text_classifier(lm.model, classes, ["a photo of a {}.", "a {}."])
    imgs = torch.stack(_fashion_tensors(8))
    with torch.no_grad():
        emb = lm.model.encode_image(imgs).numpy()
        feats = lm.model.visual(imgs)
    logits = zeroshot.logits(emb, clf.numpy())
    assert logits.shape == (8, 3) and np.isfinite(logits).all()
    assert feats.shape[0] == 8 and torch.isfinite(feats).all()
    if lm.model.config.vision_layers:  # any ResNet dims export; ViT dims must be a registered timm model
        _same_in_open_clip(lm.model, imgs)


def _same_in_open_clip(model, imgs):
    oc = build_open_clip(model)
    txt = tokenize(["a photo of a sneaker.", "a bag"])
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(imgs), model.encode_image(imgs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(oc.encode_text(txt), model.encode_text(txt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["SLIP_MOCOV3_VIT_TINY", "SLIP_BEIT_VIT_TINY"])
def test_open_clip_export_drops_ssl_parts(name):
    torch.manual_seed(0)
    _same_in_open_clip(build_model(name).eval(), torch.randn(2, 3, 64, 64))


# ------------------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def dist_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = REPO / "tests" / "dist_scripts" / "ssl_variants_equivalence.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["SLIP_MOCOV3_VIT_TINY", "SLIP_BYOL_VIT_TINY"])
def test_two_rank_ddp_equals_full_batch_reference(dist_result, name):
    assert len(dist_result) == 2
    for r in dist_result:
        m = r[name]
        assert m["loss_diff"] < 1e-8, m["losses"]
        assert m["grad_diff"] < 1e-8 * max(1.0, m["grad_scale"])
        assert m["params_without_grad"] == [] and m["n_params"] > 40
        assert m["bn_running_mean_diff"] < 1e-10  # online and target SyncBatchNorm = full-batch BatchNorm
        assert m["target_vs_rank0"] == 0.0  # EMA keeps every rank's target identical
    # the MoCo keys of the other rank matter: the loss differs from a per-rank (local keys only) loss
    if name == "SLIP_MOCOV3_VIT_TINY":
        assert dist_result[0][name]["local_keys_loss_gap"] > 1e-3


# ------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from tests._train_util import write_dataset

    return write_dataset(str(tmp_path_factory.mktemp("variant_ds")), fashion_samples(64, seed=3), per_shard=32)


@pytest.mark.parametrize("name", VARIANTS)
def test_trainer_trains_variant_and_calls_ema_hook(name, shards, tmp_path):
    from slip_core import trainer as T

    cfg = T.TrainConfig(model=name, model_overrides=SMALL[name], epochs=1, samples_per_epoch=48, batch_size=16,
                        lr=2e-3, weight_decay=0.1, warmup_epochs=0.4, num_workers=0, log_every=1, ckpt_every=2,
                        shuffle_chunk=32, threads=1)
    final = T.train(cfg, shards, str(tmp_path))
    assert final["steps"] == 3 and math.isfinite(final["loss"])
    model = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    if hasattr(model, "ema_last_momentum"):  # train() passes progress = (step + 1) / total: 1.0 at the end
        assert model.ema_last_momentum.item() == pytest.approx(cosine_momentum(model.config.ema_momentum, 3 / 3))
    if model.config.kind != "clip":
        assert "ssl_loss" in final


@pytest.mark.parametrize("name", ["SLIP_MOCOV3_VIT_TINY", "SLIP_BEIT_VIT_TINY"])
def test_trainer_resume_is_exact_with_ema_and_masks(name, shards, tmp_path, capsys):
    """Stop after 2 of 3 steps and resume from the step-2 checkpoint = an uninterrupted run, bit for bit
    (EMA target, its momentum and the BEiT masks' RNG all come back)."""
    from slip_core import trainer as T

    base = dict(model=name, model_overrides=SMALL[name], epochs=1, samples_per_epoch=48, batch_size=16, lr=2e-3,
                weight_decay=0.1, warmup_epochs=0.4, num_workers=0, log_every=1, ckpt_every=2, shuffle_chunk=32,
                threads=1)
    T.train(T.TrainConfig(**base), shards, str(tmp_path / "full"))
    T.train(T.TrainConfig(**base, max_steps=2), shards, str(tmp_path / "cut"))
    capsys.readouterr()
    T.train(T.TrainConfig(**base), shards, str(tmp_path / "cut"))  # resumes from checkpoints/latest (step 2)
    assert "at step 2" in capsys.readouterr().out
    a = load_state(str(tmp_path / "full" / "checkpoint.pt"))["state_dict"]
    b = load_state(str(tmp_path / "cut" / "checkpoint.pt"))["state_dict"]
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
