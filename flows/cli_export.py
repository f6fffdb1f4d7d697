"""`slip export ...`: hand our checkpoints and results to other tools.

  slip export open-clip CHECKPOINT DIR        (a .pt, ours or released SLIP, or a checkpoint artifact)
      -> DIR/open_clip_config.json + open_clip_model.safetensors, loadable with
         open_clip.create_model_and_transforms("local-dir:DIR") without this package
  slip export clip-benchmark RESULTS DIR [--pretrained NAME]
      RESULTS = an eval artifact (folder or manifest.json) or a results.json / `slip eval ... --out` file
      -> one CLIP_benchmark result JSON per (dataset, task): `clip_benchmark build DIR` tables them
"""
from __future__ import annotations

import argparse
import json


def _open_clip(args: argparse.Namespace) -> int:
    from evaluation.common import resolve_checkpoint
    from slip_core.open_clip_export import export

    path, _ = resolve_checkpoint(args.checkpoint)
    try:
        info = export(path, args.dir)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"slip export open-clip: {e}")
    print(json.dumps({"open_clip": f"local-dir:{args.dir}", **info}))
    return 0


def _read_records(results: str) -> list[dict]:
    from slip_core import artifacts, storage

    if results.endswith(".json") and not results.endswith(artifacts.MANIFEST_NAME):
        return json.loads(storage.read_text(results))
    m = artifacts.load_verified(results)
    files = [f.path for f in m.files if f.path.endswith("results.json")]
    if not files:
        raise SystemExit(f"slip export clip-benchmark: {results} is not an eval artifact (no results.json)")
    root = artifacts.artifact_root(artifacts.manifest_url(results))
    return json.loads(storage.read_text(storage.join(root, files[0])))


def _clip_benchmark(args: argparse.Namespace) -> int:
    from evaluation import clip_benchmark_results

    paths = clip_benchmark_results.write(_read_records(args.results), args.dir, args.pretrained)
    print(json.dumps({"clip_benchmark": args.dir, "files": len(paths)}))
    return 0


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="export a checkpoint to open_clip, results to CLIP_benchmark's format",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    oc = sub.add_parser("open-clip", help="open_clip local-dir folder (config + safetensors weights)")
    oc.add_argument("checkpoint", help="checkpoint .pt (ours or released SLIP) or a checkpoint artifact")
    oc.add_argument("dir", help="output folder (new, empty, or an earlier export: replaced atomically)")
    oc.set_defaults(func=_open_clip)
    cb = sub.add_parser("clip-benchmark", help="CLIP_benchmark result JSON files from our eval results")
    cb.add_argument("results", help="eval artifact (folder / manifest.json) or a results.json list of records")
    cb.add_argument("dir", help="output folder of <dataset>_<pretrained>_<model>_en_<task>.json files")
    cb.add_argument("--pretrained", default=None, help="the 'pretrained' column (default: checkpoint sha256[:16])")
    cb.set_defaults(func=_clip_benchmark)
