"""Export a CLIP / SLIP checkpoint to open_clip: a folder that `open_clip.create_model_and_transforms(
"local-dir:DIR")` loads in a process that never imports this package.

Layout (open_clip's local-dir schema): `open_clip_config.json` = {"model_cfg", "preprocess_cfg"},
`open_clip_model.safetensors` = the weights in open_clip's CLIP layout, `slip_export.json` = where they came from.

Towers. Text: open_clip's TextTransformer with QuickGELU and argmax pooling -- the reference text tower, same
parameter names. Vision: a ViT stays a timm ViT inside open_clip's TimmModel (class-token pool, linear
projection without bias = our image_projection). It cannot become open_clip's own VisionTransformer: open_clip
has one activation switch for both towers (`quick_gelu`), and our ViT uses exact GELU while the text tower uses
QuickGELU. Where timm itself registers a ViT with our dims (ViT-B/16, ViT-L/16 at 224 px) the config names it;
otherwise (the MoCo v3 ViT-S/16 with 12 heads, the tiny presets) the folder carries timm's own local-dir config
(`timm_vision/config.json`: a stock timm ViT constructor + our dims as model_args) and the open_clip config
points at it by absolute path, so move the folder with `slip export open-clip` again, not with `mv`.
CLIP's modified ResNet is open_clip's ModifiedResNet (same parameter names).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import timm
import torch
import torch.nn as nn

from slip_core import augment, storage
from slip_core.checkpoint import load_checkpoint, unwrap
from slip_core.models import ModelConfig, timm_model_name

CONFIG_NAME, WEIGHTS_NAME, SOURCE_NAME, TIMM_DIR = (
    "open_clip_config.json", "open_clip_model.safetensors", "slip_export.json", "timm_vision")
TIMM_VIT_CONSTRUCTOR = "vit_small_patch16_224"  # a stock timm ViT entry point; model_args set every dim
_SSL_ONLY = ("image_mlp.", "image_predictor.", "target_", "ema_", "mim_")


def _refuse_simclr(cfg: ModelConfig) -> None:
    if cfg.kind == "simclr":
        raise ValueError("SimCLR models have no text tower / joint embedding to export to open_clip")


def timm_native_name(cfg: ModelConfig) -> str | None:
    """The timm model name with this ViT's dims when timm itself ships it (not one registered by us)."""
    try:
        name = timm_model_name(cfg)
    except ValueError:
        return None
    return name if timm.models.model_entrypoint(name).__module__.startswith("timm.") else None


def timm_local_config(cfg: ModelConfig) -> dict:
    """timm's local-dir config.json describing our ViT (read by `timm.create_model("local-dir:...")`)."""
    size = cfg.image_size
    return {"architecture": TIMM_VIT_CONSTRUCTOR, "num_classes": 0,
            "model_args": {"img_size": size, "patch_size": cfg.patch_size, "embed_dim": cfg.vision_width,
                           "depth": cfg.vision_depth, "num_heads": cfg.vision_heads, "mlp_ratio": 4.0,
                           "qkv_bias": True, "class_token": True, "global_pool": "token", "num_classes": 0},
            "pretrained_cfg": {"input_size": [3, size, size], "fixed_input_size": True, "mean": list(augment.MEAN),
                               "std": list(augment.STD), "num_classes": 0}}


def open_clip_config(cfg: ModelConfig, timm_dir: str | None = None) -> dict:
    """open_clip model config (as in open_clip's model_configs/*.json) for a CLIP/SLIP model. A ViT whose dims
    timm does not ship is named by its timm local-dir folder when `timm_dir` is given (an export), else by the
    name slip_core.models registers (this process only)."""
    _refuse_simclr(cfg)
    if cfg.vision_layers:  # CLIP's modified ResNet (slip_core/resnet_clip.py) is open_clip's own class
        vision_cfg = {"layers": list(cfg.vision_layers), "width": cfg.vision_width, "image_size": cfg.image_size,
                      "head_width": cfg.vision_width * 32 // cfg.vision_heads}
    else:
        name = timm_native_name(cfg) or (f"local-dir:{timm_dir}" if timm_dir else timm_model_name(cfg))
        vision_cfg = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "token",
                      "timm_proj": "linear", "timm_proj_bias": False, "image_size": cfg.image_size}
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": True,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
                     "width": cfg.transformer_width, "heads": cfg.transformer_heads,
                     "layers": cfg.transformer_layers, "pool_type": "argmax"},
    }


def preprocess_config(cfg: ModelConfig) -> dict:
    """open_clip's preprocess_cfg closest to our val transform: short side to size (bilinear), centre crop,
    ImageNet mean/std (SPEC §5)."""
    return {"size": cfg.image_size, "mode": "RGB", "mean": list(augment.MEAN), "std": list(augment.STD),
            "interpolation": "bilinear", "resize_mode": "shortest", "fill_color": 0}


def export_state_dict(model: nn.Module) -> dict:
    """State dict in open_clip's CLIP layout (TimmModel or ModifiedResNet vision tower); SSL-only parts dropped."""
    model = unwrap(model)
    _refuse_simclr(model.config)
    out = {}
    resnet = bool(model.config.vision_layers)
    for k, v in model.state_dict().items():
        if k.startswith("visual."):
            out[k if resnet else "visual.trunk." + k[len("visual."):]] = v.clone()
        elif k == "image_projection":
            out["visual.head.proj.weight"] = v.t().contiguous().clone()
        elif not k.startswith(_SSL_ONLY):
            # token_embedding, positional_embedding, transformer.resblocks.* (nn.MultiheadAttention names),
            # ln_final, text_projection, logit_scale: identical names and layout
            out[k] = v.clone()
    return out


def build_open_clip(model: nn.Module) -> nn.Module:
    """An open_clip CLIP model (eval mode) carrying this CLIP/SLIP model's weights, in this process."""
    import open_clip  # only needed here

    model = unwrap(model)
    oc = open_clip.model.CLIP(**open_clip_config(model.config), output_dict=True)
    oc.load_state_dict(export_state_dict(model), strict=True)
    return oc.eval()


def _write_folder(model: nn.Module, tmp: Path, final: Path, source: dict) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    timm_dir = None
    if not cfg.vision_layers and timm_native_name(cfg) is None:
        (tmp / TIMM_DIR).mkdir()
        (tmp / TIMM_DIR / "config.json").write_text(json.dumps(timm_local_config(cfg), indent=2))
        timm_dir = str(final / TIMM_DIR)
    config = {"model_cfg": open_clip_config(cfg, timm_dir), "preprocess_cfg": preprocess_config(cfg)}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(export_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / SOURCE_NAME).write_text(json.dumps({**source, "model": cfg.name,
                                               "weights_sha256": storage.sha256_file(str(tmp / WEIGHTS_NAME))},
                                              indent=2))


def export(checkpoint: str, out_dir: str) -> dict:
    """Write the open_clip folder for a checkpoint file (ours or released SLIP); returns slip_export.json, which
    records the largest embedding gap between our model and the folder loaded back through open_clip's
    local-dir loader (a self-check). Atomic: built in a sibling temp folder, then renamed over `out_dir`
    (which may only hold an earlier export)."""
    final = Path(out_dir).expanduser().resolve()
    if final.exists() and any(final.iterdir()) and not (final / CONFIG_NAME).exists():
        raise FileExistsError(f"{final} exists and is not an open_clip export; choose an empty or new folder")
    model = load_checkpoint(checkpoint)
    _refuse_simclr(model.config)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_folder(model, tmp, final, {"checkpoint": str(checkpoint),
                                          "checkpoint_sha256": storage.sha256_file(str(checkpoint))})
        source = json.loads((tmp / SOURCE_NAME).read_text())
        source["max_embedding_gap"] = _self_check(model, tmp)
        (tmp / SOURCE_NAME).write_text(json.dumps(source, indent=2))
        if final.exists():
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((final / SOURCE_NAME).read_text())


@torch.no_grad()
def _self_check(model: nn.Module, tmp: Path) -> float:
    """Largest absolute embedding difference between our model and an open_clip model built from the folder
    being written (its config, its timm config, its weights file), on seeded random images and two prompts."""
    import open_clip

    from slip_core.tokenizer import tokenize

    c = model.config
    has_timm_dir = (tmp / TIMM_DIR).is_dir()
    exported = open_clip.model.CLIP(**open_clip_config(c, str(tmp / TIMM_DIR) if has_timm_dir else None))
    open_clip.load_checkpoint(exported, str(tmp / WEIGHTS_NAME), strict=True)
    exported.eval()
    images = torch.randn(2, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    texts = tokenize(["a photo of a dog.", "a diagram"], context_length=c.context_length)
    model = unwrap(model).eval()
    return max((exported.encode_image(images) - model.encode_image(images)).abs().max().item(),
               (exported.encode_text(texts) - model.encode_text(texts)).abs().max().item())
