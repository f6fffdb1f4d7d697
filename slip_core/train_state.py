"""TrainState: everything a resume restores, as one dict — shared by pretraining and fine-tuning.

    state = TrainState(model, optimizer, scaler)
    ...                                   # training moves state.step, state.loader, state.extra
    save_train_checkpoint(url, state, model_config, train_config)      # collective under torch.distributed
    state.load_state_dict(load_state(url)["train_state"], model_state=..., rank=rank)

The checkpoint format is slip_core.checkpoint's (`format`, `model_name`, `model_config`, `state_dict` = the
model weights, as released SLIP checkpoints name them) plus `train_state` and `train_config`; so every
pretraining checkpoint, resume or final, loads with `checkpoint.load_checkpoint`. Fine-tune checkpoints
carry `task: "finetune"` and the classifier's weights (slip_core/evaluation/finetune.py).

`train_state` holds: optimizer, GradScaler, step, the data-loader position (rank independent: see
slip_core/data.py), every rank's RNG states, and `extra` — room for further resume state (e.g. the best
evaluation metric so far): any mix of numbers, strings, lists, dicts and tensors that torch.save can store
with weights_only loading.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from slip_core import checkpoint as ckpt
from slip_core import storage
from slip_core.checkpoint import unwrap
from slip_core.models import ModelConfig


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_object(obj) -> list:
    """Every rank's `obj` as a list indexed by rank (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    loader: dict = field(default_factory=dict)  # the global data position (the loader's merged state)
    extra: dict = field(default_factory=dict)  # further resume state, e.g. {"best": {"step": s, "value": v}}
    world_at_save: int = 0  # world size of the run that wrote the loaded state (0: never loaded)

    def state_dict(self) -> dict:
        """Collective under torch.distributed (every rank's RNG is gathered); the model weights are not in
        it: checkpoints store them once, under `state_dict` (see save_train_checkpoint)."""
        rngs = gather_object(rng_state())
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "step": self.step, "loader": self.loader, "extra": self.extra, "world_size": world,
                "rng": {str(r): s for r, s in enumerate(rngs)}}

    def load_state_dict(self, state: dict, model_state: dict | None = None, rank: int = 0, world: int = 1,
                        rng_seed: int | None = None) -> None:
        """Restore; every RNG comes back exactly when the saving run had the same world size, otherwise (an
        elastic resume) each rank is seeded from `rng_seed` (the caller makes it depend on rank and step)."""
        if model_state is not None:
            unwrap(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.loader = dict(state.get("loader") or {})
        self.extra = dict(state.get("extra") or {})
        self.world_at_save = int(state.get("world_size", len(state.get("rng", {})) or 1))
        rngs = state.get("rng") or {}
        if self.world_at_save == world and str(rank) in rngs:
            set_rng_state(rngs[str(rank)])
        elif rng_seed is not None:
            seed_everything(rng_seed)


def checkpoint_dict(state: TrainState, model_config: ModelConfig, train_config: dict, **meta) -> dict:
    """The one checkpoint layout (collective: gathers every rank's RNG)."""
    train_state = state.state_dict()
    return {"format": ckpt.FORMAT, "model_name": model_config.name,
            "model_config": dataclasses.asdict(model_config),
            "state_dict": ckpt.strip_prefix(unwrap(state.model).state_dict()),
            "train_state": train_state, "train_config": train_config, **meta}


def save_train_checkpoint(url: str, state: TrainState, model_config: ModelConfig, train_config: dict,
                          main: bool = True, **meta) -> None:
    """Atomically write `url` on the main rank; every rank must call it (RNG states are gathered)."""
    data = checkpoint_dict(state, model_config, train_config, **meta)
    if main:
        with storage.atomic_open(str(url), "wb") as f:
            torch.save(data, f)


# ---------------------------------------------------------------------------------------------- run dirs
def latest_checkpoint(out_dir: str) -> str | None:
    pointer = storage.join(out_dir, "checkpoints", "latest")
    if not storage.exists(pointer):
        return None
    return storage.join(out_dir, "checkpoints", storage.read_text(pointer).strip())


BEST_PREFIX = "best_step_"  # checkpoints/best_step_N.pt: weights of the best evaluation so far (TrainState.extra["best"])


def best_checkpoint_url(out_dir: str, step: int) -> str:
    return storage.join(out_dir, "checkpoints", f"{BEST_PREFIX}{step:08d}.pt")


def save_best_checkpoint(out_dir: str, model: nn.Module, best: dict, train_config: dict) -> str:
    """The weights at the best evaluation so far (load_checkpoint-able, no optimizer: it is for evaluation),
    named by its step so a resume from an older checkpoint still finds the best that checkpoint recorded."""
    url = best_checkpoint_url(out_dir, int(best["step"]))
    ckpt.save_checkpoint(url, model, best=dict(best), train_config=train_config)
    return url


def prune_best_checkpoints(out_dir: str, keep_step: int | None) -> None:
    """Remove best_step_*.pt files other than `keep_step`'s: called once the resume checkpoint that records
    `keep_step` as the best is durable (older bests are dominated; later ones came from a lost trajectory)."""
    fs, path = storage.url_to_fs(storage.join(out_dir, "checkpoints"))
    keep = None if keep_step is None else best_checkpoint_url(out_dir, keep_step).rsplit("/", 1)[-1]
    for p in fs.ls(path, detail=False):
        name = p.rsplit("/", 1)[-1]
        if name.startswith(BEST_PREFIX) and name != keep:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(p)


def save_resume_checkpoint(out_dir: str, state: TrainState, model_config: ModelConfig, train_config: dict,
                           keep: int, main: bool = True) -> str:
    """checkpoints/step_N.pt atomically, then the `latest` pointer atomically, then prune to `keep` files."""
    name = f"step_{state.step:08d}.pt"
    url = storage.join(out_dir, "checkpoints", name)
    save_train_checkpoint(url, state, model_config, train_config, main=main)
    if main:
        storage.atomic_write_text(storage.join(out_dir, "checkpoints", "latest"), name)
        fs, path = storage.url_to_fs(storage.join(out_dir, "checkpoints"))
        old = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step_"))
        for p in old[:-keep] if keep > 0 else []:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(p)
    return url
