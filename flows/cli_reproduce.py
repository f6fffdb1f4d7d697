"""`slip reproduce`, `slip status`, `slip serve`, `slip lineage`.

    slip reproduce [--preset tiny] [--store STORE] [--source S] [--subset S] [--rebuild STAGE]
                   [--set train.max_steps=100 --set eval.max_samples=500 ...] [--resume-from CKPT]
                   [--which final|best]
                   [--dry-run [--json]]
    slip status    [--preset tiny] [--store STORE] [--source S] [--subset S] [--set ...] [--json]
    (both: [--no-baselines] to leave out the preset's comparison baselines, e.g. the demo's CLIP run)

`--set STAGE.KEY=VALUE` overrides a stage config of the preset (STAGE: dataset | train | eval | corpus, the
last for the demo corpus' arguments, e.g. corpus.n_fashion=240). `slip status` (= `reproduce --dry-run`
without the compute estimate) prints per stage `cached` and the artifact, or `will run` and why.
"""
from __future__ import annotations

import argparse
import json

from flows.cli import add_store
from slip_core.config import ConfigError, parse_sets

OVERRIDE_STAGES = ("dataset", "train", "eval", "corpus")


def stage_overrides(sets: list[str] | None) -> dict[str, dict]:
    """['train.lr=1e-3', 'eval.max_samples=500'] -> {"train": {"lr": 0.001}, "eval": {"max_samples": 500}}."""
    out: dict[str, dict] = {}
    for key, value in parse_sets(sets).items():
        stage, _, rest = key.partition(".")
        if stage not in OVERRIDE_STAGES or not rest:
            raise ConfigError(f"--set {key}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(OVERRIDE_STAGES)}")
        out.setdefault(stage, {})[rest] = value
    return out


def _request(args: argparse.Namespace):
    from flows.status import Request

    o = stage_overrides(args.sets)
    if getattr(args, "which", None):  # = --set eval.which=...
        o.setdefault("eval", {})["which"] = args.which
    return Request(preset=args.preset, store=args.store, source=args.source, subset=args.subset,
                   rebuild=getattr(args, "rebuild", None), dataset_config=o.get("dataset"),
                   train_config=o.get("train"), eval_config=o.get("eval"), demo_corpus=o.get("corpus"),
                   nproc=args.nproc, baselines=not args.no_baselines)


def _status(args: argparse.Namespace, estimate: bool = False) -> int:
    from flows import status
    from flows.presets import reproduce_preset

    req = _request(args)
    p = status.effective_preset(req, reproduce_preset(req.preset))
    source, subset, _ = status.demo_source(req, p, build=False)
    plans = status.reproduce_plan(req, p, source, subset)
    if getattr(args, "resume_from", None) and plans["train"].state == "run":
        plans["train"].reasons.append(f"continues from {args.resume_from} (--resume-from)")
    if args.json:
        print(json.dumps(status.to_json(plans)))
        return 0
    print(status.format_plan(plans))
    if estimate:
        from flows.plan import dry_run_plan

        print("\n" + dry_run_plan(req.preset))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from flows.presets import reproduce_preset
    from flows.reproduce import reproduce

    reproduce_preset(args.preset)  # an unknown preset fails before Prefect starts
    if args.dry_run:
        return _status(args, estimate=True)
    req = _request(args)
    result = reproduce(preset=req.preset, store=req.store, source=req.source, subset=req.subset, rebuild=req.rebuild,
                       train_config=req.train_config, eval_config=req.eval_config, demo_corpus=req.demo_corpus,
                       dataset_config=req.dataset_config, nproc=req.nproc, resume_from=args.resume_from,
                       baselines=req.baselines)
    print(json.dumps(result, indent=2))
    print(f"\nreport: {result['report']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.scheduled import DATASET_CRON, EVAL_CRON, serve_forever

    serve_forever(store=args.store, source=args.source, subset=args.subset,
                  dataset_cron=args.dataset_cron or DATASET_CRON, eval_cron=args.eval_cron or EVAL_CRON)
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from slip_core.artifacts import format_lineage

    print(format_lineage(args.artifact))
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (the demo) or a paper preset")
    add_store(p)
    p.add_argument("--source", default=None, help="metadata/URL table (default: the preset's; tiny builds the demo corpus)")
    p.add_argument("--subset", default=None, help="YFCC subset TSV (line number, photo id, hash)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage config: dataset.KEY, train.KEY, eval.KEY or corpus.KEY (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="training processes per node")
    p.add_argument("--json", action="store_true", help="print the per-stage status as one JSON object")
    p.add_argument("--no-baselines", action="store_true",
                   help="only the preset's own model: skip its comparison baselines (the demo's CLIP run)")
    p.add_argument("--which", choices=["final", "best"], default=None,
                   help="evaluate the final or the best in-training checkpoint (= --set eval.which=...; "
                        "default: the eval preset's, paper: best, tiny: final)")


def register(subparsers, name: str) -> None:
    if name == "reproduce":
        p = subparsers.add_parser(name, help="dataset -> pretrain -> eval as one cached Prefect flow")
        _plan_args(p)
        p.add_argument("--rebuild", choices=["dataset", "train", "eval"], default=None,
                       help="force this stage and everything downstream to run again")
        p.add_argument("--resume-from", default=None, metavar="ARTIFACT_OR_CHECKPOINT",
                       help="continue training from another run's checkpoint (see slip train --resume-from)")
        p.add_argument("--dry-run", action="store_true",
                       help="print per stage cached/will run and why, and the compute estimate; run nothing")
        p.set_defaults(func=_reproduce)
    elif name == "status":
        p = subparsers.add_parser(name, help="per stage: cached (artifact) or will run (why); runs nothing")
        _plan_args(p)
        p.add_argument("--rebuild", choices=["dataset", "train", "eval"], default=None,
                       help="show what forcing this stage (and everything downstream) would do")
        p.set_defaults(func=_status)
    elif name == "serve":
        p = subparsers.add_parser(name, help="serve scheduled deployments against a running Prefect server")
        add_store(p)
        p.add_argument("--source", default=None, help="metadata snapshot to rebuild nightly (omit: eval sweep only)")
        p.add_argument("--subset", default=None)
        p.add_argument("--dataset-cron", default=None, help="default: nightly at 03:00 UTC")
        p.add_argument("--eval-cron", default=None, help="default: hourly")
        p.set_defaults(func=_serve)
    elif name == "lineage":
        p = subparsers.add_parser(name, help="print an artifact's lineage from its manifests")
        p.add_argument("artifact", help="artifact folder or manifest.json URL")
        p.set_defaults(func=_lineage)
