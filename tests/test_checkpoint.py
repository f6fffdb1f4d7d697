"""Checkpoints: our format, the released SLIP format, safe loading, fsspec URLs, open_clip export."""
from __future__ import annotations

import argparse
import io
import os

import open_clip
import pytest
import torch

from slip_core.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from slip_core.open_clip_export import build_open_clip, open_clip_config
from slip_core.open_clip_export import export_state_dict as export_open_clip
from slip_core.registry import build_model
from slip_core.tokenizer import tokenize

torch.set_num_threads(1)

IMG = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TXT = tokenize(["a photo of a cat", "a dog", "word " * 100])


def _trained_tiny(name="SLIP_VIT_TINY"):
    """A tiny model whose BN running stats moved (so buffers matter in the round trip)."""
    torch.manual_seed(0)
    m = build_model(name)
    if m.config.kind != "clip":
        m.train()
        m.image_mlp(m.visual(torch.randn(8, 3, 64, 64)))
    return m.eval()


def _same_outputs(a, b):
    with torch.no_grad():
        assert torch.equal(a.encode_image(IMG), b.encode_image(IMG))
        if hasattr(a, "encode_text"):
            assert torch.equal(a.encode_text(TXT), b.encode_text(TXT))
        if hasattr(a, "image_mlp"):
            assert torch.equal(a.image_mlp(a.visual(IMG)), b.image_mlp(b.visual(IMG)))


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_our_format_round_trip(tmp_path, url_kind):
    m = _trained_tiny()
    url = str(tmp_path / "sub" / "ckpt.pt") if url_kind == "local" else "memory://slip-test/ckpt.pt"
    rng = torch.get_rng_state()
    save_checkpoint(url, m, step=7, rng={"torch": rng}, note="hello")
    loaded = load_checkpoint(url)
    assert not loaded.training and loaded.config == m.config
    _same_outputs(m, loaded)
    state = load_state(url)
    assert state["format"] == "slip-pipeline/1" and state["model_name"] == "SLIP_VIT_TINY"
    assert state["step"] == 7 and torch.equal(state["rng"]["torch"], rng) and state["note"] == "hello"
    # plain torch.load(weights_only=True) works too: no custom classes in our format
    if url_kind == "local":
        assert torch.load(url, weights_only=True)["model_config"]["vision_width"] == m.config.vision_width
        assert not [f for f in os.listdir(tmp_path / "sub") if f != "ckpt.pt"]  # no temp files left
    with pytest.raises(ValueError):
        save_checkpoint(url, m, state_dict={})


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    m = _trained_tiny("CLIP_VIT_TINY")
    wrapper = torch.nn.Module()
    wrapper.module = m  # what DDP looks like to save_checkpoint
    save_checkpoint(tmp_path / "c.pt", wrapper)
    assert all(not k.startswith("module.") for k in load_state(tmp_path / "c.pt")["state_dict"])
    _same_outputs(m, load_checkpoint(tmp_path / "c.pt"))


@pytest.mark.parametrize("name", ["SLIP_VIT_TINY", "CLIP_VIT_TINY", "SIMCLR_VIT_TINY"])
def test_released_format(tmp_path, name):
    m = _trained_tiny(name)
    args = argparse.Namespace(model=name, ssl_mlp_dim=512, ssl_emb_dim=128, lr=3e-3, wd=0.5, epochs=25,
                              output_dir="/checkpoint/slip", dist_url="env://", norm_pix_loss=None)
    if name == "CLIP_VIT_TINY":
        del args.ssl_mlp_dim, args.ssl_emb_dim  # SPEC §9.9: only model + head dims may be relied on
    opt = torch.optim.AdamW(m.parameters())
    released = {"epoch": 25, "args": args, "state_dict": {"module." + k: v for k, v in m.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": {"scale": 65536.0, "_growth_tracker": 0},
                "best_acc1": 34.3}
    torch.save(released, tmp_path / "checkpoint_best.pt")
    loaded = load_checkpoint(str(tmp_path / "checkpoint_best.pt"))
    assert type(loaded) is type(m) and not loaded.training
    _same_outputs(m, loaded)
    assert load_state(tmp_path / "checkpoint_best.pt")["args"].model == name
    # a mismatching state dict is a clear error, not a silent partial load
    released["state_dict"].pop(next(iter(released["state_dict"])))
    torch.save(released, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "bad.pt")


class Payload:
    """A pickled object outside the allow-list; unpickling it would run os.system."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_refuses_objects_outside_allow_list(tmp_path, fault_log):
    marker = tmp_path / "pwned"
    m = _trained_tiny("CLIP_VIT_TINY")
    torch.save({"epoch": 1, "args": argparse.Namespace(model="CLIP_VIT_TINY"), "state_dict": m.state_dict(),
                "evil": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="allow-list"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"state_dict": {}, "args": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="allow-list"):
        load_state(tmp_path / "module.pt")
    fault_log.record("input", "checkpoint", "checkpoint holding a pickled object outside the allow-list "
                     "(os.system payload; a whole nn.Module)", "CheckpointError naming the allow-list for both; "
                     "the payload never ran (marker file absent)")


def test_corrupt_truncated_missing(tmp_path, fault_log):
    m = _trained_tiny("CLIP_VIT_TINY")
    save_checkpoint(tmp_path / "ok.pt", m)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for bad in ("trunc.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(tmp_path / bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buf)
    (tmp_path / "other.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not a SLIP checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    fault_log.record("input", "checkpoint", "corrupted checkpoint: truncated to half, random bytes, zero bytes",
                     "CheckpointError 'corrupt' for each; a missing file raises FileNotFoundError; a foreign torch "
                     "file raises 'not a SLIP checkpoint'")


@pytest.mark.parametrize("name", ["SLIP_VIT_TINY", "CLIP_VIT_TINY"])
def test_export_open_clip_embeddings(name):
    m = _trained_tiny(name)
    oc = open_clip.model.CLIP(**open_clip_config(m.config), output_dict=True).eval()
    oc.load_state_dict(export_open_clip(m), strict=True)
    assert isinstance(build_open_clip(m), open_clip.model.CLIP)
    with torch.no_grad():
        assert (oc.encode_image(IMG) - m.encode_image(IMG)).abs().max().item() < 1e-5
        assert (oc.encode_text(TXT) - m.encode_text(TXT)).abs().max().item() < 1e-5
        feats = oc(IMG, TXT)
        assert feats["logit_scale"].item() == pytest.approx(m.logit_scale.exp().item())
    # the SLIP text tower pools at argmax: a cut caption (no EOT) pools identically in open_clip
    assert 49407 not in TXT[2].tolist()
    with pytest.raises(ValueError):
        export_open_clip(build_model("SIMCLR_VIT_TINY"))


@pytest.mark.parametrize("name", ["SLIP_VITS16", "CLIP_VITB16", "SLIP_VITL16"])
def test_export_layout_for_paper_models(name):
    with torch.device("meta"):
        m = build_model(name)
        oc = open_clip.model.CLIP(**open_clip_config(m.config))
    exported = {k: tuple(v.shape) for k, v in export_open_clip(m).items()}
    assert exported == {k: tuple(v.shape) for k, v in oc.state_dict().items()}
    # shapes do not show the head count: the registered timm name must carry it (ViT-S/16: 12 heads)
    assert {b.attn.num_heads for b in oc.visual.trunk.blocks} == {m.config.vision_heads}
