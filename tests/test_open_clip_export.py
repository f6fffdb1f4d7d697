"""`slip export open-clip`: a folder open_clip loads in a clean process (never importing our package) that scores
held-out images like our own zero-shot through CLIP_benchmark's zero-shot code; `slip export clip-benchmark`:
our results in CLIP_benchmark's JSON format, tabled by CLIP_benchmark's own `build` code."""
from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import catalog
from datasets.offline import fashion_mnist
from evaluation import common, zeroshot
from evaluation.tasks import EvalConfig, run_task
from slip_core.checkpoint import save_checkpoint
from slip_core.registry import build_model
from slip_core.open_clip_export import export
from tests._eval_util import random_checkpoint, tiny_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
STANDALONE = REPO / "tests" / "standalone" / "open_clip_zeroshot.py"


def run_clean(tmp_path: Path, *args: str) -> dict:
    """The standalone script in a fresh interpreter: no PYTHONPATH, cwd outside the repo."""
    out = tmp_path / f"clean-{len(list(tmp_path.glob('clean-*.json')))}.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(STANDALONE), *args[:4], str(out), *args[4:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["imported_ours"] == [], res["imported_ours"]
    return res


def fashion_folder(root: Path, n: int = 1000) -> Path:
    """The first n Fashion-MNIST TEST images as <root>/fashion_mnist/test/<label>/<i>.png (an ImageFolder that
    our catalog and torchvision read alike; folder names sort in label order)."""
    images, labels = fashion_mnist("test")
    for i in range(n):
        d = root / "fashion_mnist" / "test" / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:05d}.png")
    return root / "fashion_mnist" / "test"


@pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None, reason="clip-benchmark not installed")
def test_export_scores_like_our_zero_shot_through_clip_benchmark(tmp_path):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    ckpt = tiny_checkpoint()["path"]
    out_dir = tmp_path / "export"
    info = export(ckpt, str(out_dir))
    assert info["max_embedding_gap"] < 1e-5 and info["model"] == "CLIP_VIT_TINY"
    assert {p.name for p in out_dir.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                                   "slip_export.json", "timm_vision"}
    folder = fashion_folder(tmp_path / "data")
    lm = common.load_model(ckpt)
    cfg = json.loads((out_dir / "open_clip_config.json").read_text())
    same_pre = image_transform_v2(PreprocessCfg(**cfg["preprocess_cfg"]), is_train=False)
    ours = zeroshot.evaluate(lm, catalog.load("fashion_mnist", "test", same_pre, str(tmp_path / "data")),
                             cache_dir=str(tmp_path / "cache"))
    default = zeroshot.evaluate(lm, catalog.load("fashion_mnist", "test", common.zeroshot_transform(64),
                                                 str(tmp_path / "data")), cache_dir=str(tmp_path / "cache"))
    loaded = catalog.load("fashion_mnist", "test", same_pre, str(tmp_path / "data"))
    (tmp_path / "classes.json").write_text(json.dumps(loaded.classnames))
    (tmp_path / "templates.json").write_text(json.dumps([t.replace("{}", "{c}") for t in loaded.templates]))
    theirs = run_clean(tmp_path, str(out_dir), str(folder), str(tmp_path / "classes.json"),
                       str(tmp_path / "templates.json"))
    gap = abs(ours["value"] - 100 * theirs["acc1"])
    print(f"\nzero-shot fashion_mnist ({theirs['num_samples']} test images): ours {ours['value']:.2f}, "
          f"open_clip export + CLIP_benchmark {100 * theirs['acc1']:.2f} (gap {gap:.2f} pt); ours with our own "
          f"OpenCV preprocessing {default['value']:.2f}")
    assert theirs["num_samples"] == ours["num_samples"] == 1000 and theirs["visual"] == "TimmModel"
    assert ours["value"] > 25.0  # a model that learned: the agreement is not chance against chance
    assert gap <= 0.1
    assert abs(ours["mean_per_class"] - 100 * theirs["mean_per_class_recall"]) <= 0.1


@pytest.mark.parametrize("name,overrides", [
    ("SLIP_VITS16", dict(transformer_width=64, transformer_layers=1, transformer_heads=1, context_length=16)),
    ("CLIP_RN_TINY", {}),
])
def test_exports_stand_alone_with_our_embeddings(tmp_path, name, overrides):
    """ViT-S/16 has 12 heads (MoCo v3), a shape timm does not ship; CLIP's ResNet is open_clip's own class."""
    from slip_core.tokenizer import tokenize

    torch.manual_seed(0)
    model = build_model(name, **overrides).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    export(str(tmp_path / "m.pt"), str(tmp_path / "export"))
    size = model.config.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of a dog.", "two cats on a sofa", "an aerial view of a city at night"]
    torch.save({"images": images, "texts": texts}, tmp_path / "t.pt")
    res = run_clean(tmp_path, str(tmp_path / "export"), "-", "-", "-", str(tmp_path / "t.pt"))
    with torch.no_grad():
        img = model.encode_image(images).numpy()
        txt = model.encode_text(tokenize(texts, context_length=model.config.context_length)).numpy()
    assert np.abs(np.array(res["image_embed"]) - img).max() < 1e-4
    assert np.abs(np.array(res["text_embed"]) - txt).max() < 1e-4
    if name == "SLIP_VITS16":
        assert res["visual"] == "TimmModel" and res["heads"] == [12]
    else:
        assert res["visual"] == "ModifiedResNet"


def test_export_cli_refusals_and_reexport(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "export", "open-clip"]
    ok = subprocess.run(cmd + [random_checkpoint(), str(tmp_path / "oc")], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["open_clip"] == f"local-dir:{tmp_path / 'oc'}"
    first = (tmp_path / "oc" / "open_clip_model.safetensors").stat().st_ino
    export(random_checkpoint(), str(tmp_path / "oc"))  # an earlier export is replaced as a whole
    assert (tmp_path / "oc" / "open_clip_model.safetensors").stat().st_ino != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".oc.")]  # no temp folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an open_clip export"):
        export(random_checkpoint(), str(tmp_path / "mine"))
    save_checkpoint(tmp_path / "simclr.pt", build_model("SIMCLR_VIT_TINY"))
    bad = subprocess.run(cmd + [str(tmp_path / "simclr.pt"), str(tmp_path / "s")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no text tower" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "s").exists()


def clip_benchmark_build(files: list[str], output: str) -> None:
    """CLIP_benchmark's own `clip_benchmark build` (cli.main_build), run from its source: importing its cli
    module needs pycocoevalcap (captioning), an optional dependency we do not install."""
    spec = importlib.util.find_spec("clip_benchmark")
    src = Path(spec.submodule_search_locations[0], "cli.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "main_build")
    namespace = {"json": json, "os": os, "csv": csv}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "clip_benchmark/cli.py", "exec"), namespace)
    namespace["main_build"](argparse.Namespace(files=files, output=output))


@pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None, reason="clip-benchmark not installed")
def test_results_in_clip_benchmark_format_are_tabled_by_its_build(tmp_path):
    lm = common.load_model(random_checkpoint())
    cfg = EvalConfig(data_root=str(tmp_path / "data"), device="cpu", max_samples=200, max_train_samples=400)
    records = [run_task(t, lm, d, cfg, cache_dir=str(tmp_path / "cache"), log=lambda s: None)
               for t, d in (("zeroshot", "digits"), ("linear", "digits"), ("retrieval", "photos"))]
    records.append({"task": "zeroshot", "dataset": "imagenet", "value": None, "reason": "not found"})
    (tmp_path / "results.json").write_text(json.dumps(records))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "export", "clip-benchmark", str(tmp_path / "results.json"),
                          str(tmp_path / "cb"), "--pretrained", "demo"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == [
        "digits_demo_CLIP_VIT_TINY_en_linear_probe.json", "digits_demo_CLIP_VIT_TINY_en_zeroshot_classification.json",
        "photos_demo_CLIP_VIT_TINY_en_zeroshot_retrieval.json"]
    clip_benchmark_build([str(tmp_path / "cb")], str(tmp_path / "benchmark.csv"))
    rows = {r["task"]: r for r in csv.DictReader(open(tmp_path / "benchmark.csv"))}
    zs, lp, rt = rows["zeroshot_classification"], rows["linear_probe"], rows["zeroshot_retrieval"]
    assert zs["model_fullname"] == "CLIP_VIT_TINY demo" and zs["dataset"] == "digits" and zs["language"] == "en"
    assert float(zs["acc1"]) == pytest.approx(records[0]["top1"] / 100)
    assert float(zs["mean_per_class_recall"]) == pytest.approx(records[0]["mean_per_class"] / 100)
    assert float(lp["lp_acc1"]) == pytest.approx(records[1]["top1"] / 100)
    assert float(rt["image_retrieval_recall@5"]) == pytest.approx(records[2]["text_to_image_R@5"] / 100)
    assert float(rt["text_retrieval_recall@1"]) == pytest.approx(records[2]["image_to_text_R@1"] / 100)
    assert math.isfinite(float(zs["acc5"]))  # 10 classes: a top-5 exists
