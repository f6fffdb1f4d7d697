"""`slip eval ...`: evaluate a checkpoint (ours or a released SLIP .pt) from the command line.

  slip eval zeroshot  --checkpoint PATH --dataset NAME [--dataset NAME ...] [--data-root DIR] [--max-samples N]
                      [--device auto|cpu|cuda] [--nproc N (torchrun ranks extracting features)]
                      [--reference-prompts DIR (SLIP's templates.json, labels.json, dataset_catalog.json)]
  slip eval linear    --checkpoint PATH --dataset NAME [--recipe fast|reference] [--epochs N] ...
  slip eval finetune  --checkpoint PATH --dataset NAME [--preset tiny|vits16|vitb16|vitl16] [--nproc N] [--set k=v]
  slip eval retrieval --checkpoint PATH [--dataset photos]
  slip eval run       --checkpoint PATH_OR_MANIFEST [--preset tiny|paper|zeroshot26] [--store STORE]   (Prefect flow)
                      [--which final|best (default: the preset's; paper and zeroshot26: best)]
  (every action: --which final|best picks a checkpoint artifact's final or best in-training checkpoint)
  slip eval list      [--data-root DIR]        (catalog: formats, metric, found on disk or how to obtain)
  slip eval prepare   NAME [--data-root DIR]   (materialise a local offline set)

The direct commands run without Prefect and print one JSON record per (task, dataset) (`--out FILE` also
writes them as a JSON list); `run` is the cached Prefect flow that publishes an eval artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from flows.cli import add_store
from slip_core.config import parse_sets


def _ranks(args: argparse.Namespace) -> int:
    """`--nproc N` for zero-shot / linear / retrieval: rerun this command under torchrun, N ranks extracting
    features (rank 0 prints the records)."""
    from slip_core.launch import default_threads

    argv = list(args.cli_argv)
    i = argv.index("--nproc")
    argv[i:i + 2] = []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "flows.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(default_threads(args.nproc, args.workers))}
    return subprocess.call(cmd, env=env)


def _direct(args: argparse.Namespace) -> int:
    if args.action != "finetune" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _ranks(args)
    import torch.distributed as dist

    from slip_core.distributed import get_rank, init_from_env, local_device

    created = init_from_env(local_device(args.device))
    try:
        return _evaluate_direct(args, main=get_rank() == 0)
    finally:
        if created:
            dist.destroy_process_group()


def _evaluate_direct(args: argparse.Namespace, main: bool) -> int:
    from datasets.catalog import DatasetMissing
    from datasets.prompts import load_reference
    from evaluation import common
    from evaluation.tasks import EvalConfig, run_task
    from evaluation.zeroshot import NotApplicable

    cfg = EvalConfig(data_root=args.data_root, max_samples=args.max_samples, batch_size=args.batch_size,
                     num_workers=args.workers, device=args.device, reference_prompts=args.reference_prompts)
    load_reference(cfg.reference_prompts)  # a bad folder: one line, before the model loads
    if args.action == "linear":
        cfg.linear_recipe = args.recipe
        cfg.max_train_samples = args.max_train_samples
        if args.epochs:
            cfg.reference_probe.epochs = args.epochs
    if args.action == "finetune":
        cfg.finetune_preset, cfg.finetune_nproc = args.preset, args.nproc
        cfg.finetune_overrides = parse_sets(args.sets)
    lm = common.load_model(args.checkpoint, args.which)
    records, status = [], 0
    for ds in args.dataset or (["photos"] if args.action == "retrieval" else []):
        try:
            rec = run_task(args.action, lm, ds, cfg, cache_dir=args.cache_dir, log=lambda s: print(s, file=sys.stderr))
        except (DatasetMissing, NotApplicable) as e:
            print(f"error: {e}", file=sys.stderr)
            rec, status = {"dataset": ds, "task": args.action, "value": None, "reason": str(e)}, 1
        if main:
            records.append(rec)
            print(json.dumps(rec))
    if not main:
        return status
    if not records:
        raise SystemExit("give at least one --dataset")
    if args.out:
        from slip_core import storage

        storage.atomic_write_text(args.out, json.dumps(records, indent=2))
    return status


def _run(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate, make_config

    overrides = parse_sets(args.sets)
    if args.which:
        overrides["which"] = args.which
    make_config(args.preset, overrides)  # fail fast on a typo, before Prefect starts
    url = evaluate(checkpoint=args.checkpoint, store=args.store, config=overrides or None, preset=args.preset)
    print(json.dumps({"eval": url}))
    return 0


def _list(args: argparse.Namespace) -> int:
    from datasets import catalog, retrieval_sets

    for name, entry in catalog.CATALOG.items():
        try:
            fmt, path = catalog.locate(name, "test", args.data_root)
            where = f"found ({fmt}) at {path}"
        except catalog.DatasetMissing:
            where = "missing: " + entry.how_to_obtain(catalog.data_root(args.data_root) / name)
        print(f"{name:<20} {entry.num_classes:>5} classes  {entry.metric:<15} formats={','.join(entry.formats):<30} {where}")
    for name, spec in retrieval_sets.RETRIEVAL_CATALOG.items():
        try:
            split = retrieval_sets.load(name, args.data_root)
            where = f"found ({split.format}) at {split.path}: {len(split)} images"
        except catalog.DatasetMissing:
            where = "missing: " + spec.obtain
        print(f"{name:<20} {'retrieval':>13}  {'R@1/5/10':<15} formats={'karpathy,wds,jsonl':<30} {where}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from datasets import catalog

    print(catalog.prepare(args.name, args.data_root))
    return 0


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="zero-shot, linear probe, fine-tune and retrieval evaluation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_ in (("zeroshot", "zero-shot classification (SPEC §7)"),
                          ("linear", "linear probe on frozen features"),
                          ("finetune", "end-to-end fine-tune (BEiT recipe, torchrun)"),
                          ("retrieval", "image<->text recall@1/5/10")):
        a = sub.add_parser(action, help=help_)
        a.add_argument("--checkpoint", required=True, help="our checkpoint.pt, a released SLIP .pt, or a checkpoint artifact")
        a.add_argument("--dataset", action="append", help="catalog name (repeatable); `slip eval list` shows them")
        a.add_argument("--data-root", default=None, help="eval data root (default $SLIP_EVAL_DATA or .data/eval)")
        a.add_argument("--max-samples", type=int, default=None, help="reproducible subsample of the test split")
        a.add_argument("--batch-size", type=int, default=256)
        a.add_argument("--workers", type=int, default=0, help="data loader workers")
        a.add_argument("--cache-dir", default=None, help="feature/classifier cache (default $SLIP_EVAL_CACHE or .data/eval-cache)")
        a.add_argument("--out", default=None, help="also write the records as a JSON list here")
        a.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
        a.add_argument("--which", choices=["final", "best"], default="final",
                       help="of a checkpoint artifact: its final checkpoint or the best in-training one")
        a.add_argument("--reference-prompts", default=None, metavar="DIR",
                       help="SLIP's templates.json + labels.json (+ dataset_catalog.json): their prompts verbatim")
        if action != "finetune":
            a.add_argument("--nproc", type=int, default=1,
                           help="torchrun ranks extracting features (each a slice, gathered on rank 0)")
        if action == "linear":
            a.add_argument("--recipe", choices=["fast", "reference"], default="fast")
            a.add_argument("--max-train-samples", type=int, default=None)
            a.add_argument("--epochs", type=int, default=None, help="reference recipe epochs (default 90)")
        if action == "finetune":
            a.add_argument("--preset", default=None, help="tiny | vits16 | vitb16 | vitl16 (default: by model size)")
            a.add_argument("--nproc", type=int, default=1)
            a.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                           help="FinetuneConfig override, e.g. --set epochs=5 (repeatable)")
        a.set_defaults(func=_direct)
    r = sub.add_parser("run", help="the cached Prefect evaluation flow; publishes an eval artifact")
    r.add_argument("--checkpoint", required=True, help="checkpoint manifest URL/folder or a .pt file")
    r.add_argument("--preset", default="tiny", help="tiny | paper | zeroshot26")
    r.add_argument("--which", choices=["final", "best"], default=None,
                   help="the artifact's final or best in-training checkpoint (default: the preset's; paper: best)")
    add_store(r)
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="EvalConfig override, e.g. --set max_samples=500 or --set data_root=/data (repeatable)")
    r.set_defaults(func=_run)
    ls = sub.add_parser("list", help="the eval catalog and what is on disk")
    ls.add_argument("--data-root", default=None)
    ls.set_defaults(func=_list)
    pr = sub.add_parser("prepare", help="materialise a local offline eval set (fashion_mnist, mnist, digits)")
    pr.add_argument("name")
    pr.add_argument("--data-root", default=None)
    pr.set_defaults(func=_prepare)
