"""Checkpoints: save/load ours and the released SLIP format safely (export to open_clip: slip_core/open_clip_export.py).

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` with exactly one extra class
allow-listed (`argparse.Namespace`, which the released checkpoints use for `args`). Anything else in the
pickle is refused with a CheckpointError that names the offending global.

Our format: {"format": "slip-pipeline/1", "model_name", "model_config" (dict), "state_dict", **extra}; the
trainers' extra is `train_state` + `train_config` (slip_core/train_state.py), fine-tunes add `task`.
Released format: {"epoch", "args": Namespace(model=..., ssl_mlp_dim, ssl_emb_dim, ...), "state_dict" with
DDP "module." prefixes, "optimizer", "scaler", "best_acc1"} (SPEC §3; only model + head dims are needed,
§9.9).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import pickle
import zipfile

import torch
import torch.nn as nn

from slip_core import storage
from slip_core.models import ModelConfig
from slip_core.registry import build_model_from_config, get_config

FORMAT = "slip-pipeline/1"
SAFE_GLOBALS = [argparse.Namespace]
_RESERVED = ("format", "model_name", "model_config", "state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: corrupt, truncated, unsafe, or of an unknown layout."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def checkpoint_dict(model: nn.Module, **extra) -> dict:
    """The dict `save_checkpoint` writes (the trainer adds optimizer/step/rng/loader keys via `extra`)."""
    clash = set(extra) & set(_RESERVED)
    if clash:
        raise ValueError(f"extra checkpoint keys {sorted(clash)} are reserved")
    model = unwrap(model)
    cfg: ModelConfig = model.config
    return {"format": FORMAT, "model_name": cfg.name, "model_config": dataclasses.asdict(cfg),
            "state_dict": strip_prefix(model.state_dict()), **extra}


def save_checkpoint(path_or_url: str, model: nn.Module, **extra) -> None:
    """Atomically write our checkpoint format to a local path or any fsspec URL."""
    state = checkpoint_dict(model, **extra)
    with storage.atomic_open(str(path_or_url), "wb") as f:
        torch.save(state, f)


def load_state(path_or_url: str, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded with weights_only=True and only argparse.Namespace allow-listed."""
    url = str(path_or_url)
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    # local files are read by torch directly (no extra in-memory copy); other URLs through fsspec
    if storage.is_local(url):
        source, size = storage.url_to_fs(url)[1], storage.file_size(url)
    else:
        data = storage.read_bytes(url)
        source, size = io.BytesIO(data), len(data)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refusals are UnpicklingErrors whose message names the global; corrupt pickles too.
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "not an allowed global" in msg:
            culprit = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            raise CheckpointError(
                f"refusing to load {url}: it contains a pickled object outside the allow-list "
                f"({[c.__module__ + '.' + c.__name__ for c in SAFE_GLOBALS]}): {culprit}") from e
        raise CheckpointError(f"corrupt checkpoint {url}: {msg}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        # (random bytes can also surface as IndexError / KeyError from the weights_only unpickler)
        raise CheckpointError(f"corrupt or truncated checkpoint {url} ({size} bytes): {e}") from e
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{url} is not a SLIP checkpoint (expected a dict with a 'state_dict')")
    return state


def config_from_state(state: dict) -> ModelConfig:
    """Model config of our format or of a released checkpoint's `args`."""
    if state.get("format") == FORMAT:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = state["model_config"]
        unknown = set(cfg) - fields
        if unknown:
            raise CheckpointError(f"checkpoint model_config has unknown fields {sorted(unknown)}")
        return ModelConfig(**cfg)
    if "args" in state:
        args = state["args"]
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        if "model" not in args:
            raise CheckpointError("released checkpoint args lack 'model'")
        # Only the head dims are read (SPEC §9.9: args may lack ssl_scale and carry other fields).
        overrides = {k: int(args[k]) for k in ("ssl_mlp_dim", "ssl_emb_dim") if args.get(k) is not None}
        try:
            return get_config(str(args["model"]), **overrides)
        except KeyError as e:
            raise CheckpointError(str(e)) from e
    raise CheckpointError(f"unknown checkpoint layout (keys {sorted(state)[:8]})")


def load_checkpoint(path_or_url: str, map_location="cpu") -> nn.Module:
    """Rebuild the model of a checkpoint (ours or released SLIP format), load weights strictly, eval mode."""
    state = load_state(path_or_url, map_location=map_location)
    if state.get("task", "pretrain") != "pretrain":
        raise CheckpointError(f"{path_or_url} is a {state['task']} checkpoint (its own head and weights), "
                              "not a pretrained model; its stage loads it (slip_core/evaluation/finetune.py)")
    cfg = config_from_state(state)
    if cfg.mim_tokenizer and "mim_tokenizer.codebook" in state["state_dict"]:
        # SLIP-BEiT with a codebook file: the codebook travels in the state dict, the file is not needed
        model = build_model_from_config(dataclasses.replace(cfg, mim_tokenizer=""))
        model.config = cfg
    else:
        model = build_model_from_config(cfg)
    missing, unexpected = model.load_state_dict(strip_prefix(state["state_dict"]), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path_or_url}: state_dict does not match {cfg.name}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return model.eval()
