"""`slip reproduce`, `slip serve`, `slip lineage`."""
from __future__ import annotations

import argparse
import json
import os

DEFAULT_STORE = os.environ.get("SLIP_STORE", os.path.join(os.getcwd(), "out", "store"))


def _reproduce(args: argparse.Namespace) -> int:
    from flows.plan import dry_run_plan
    from flows.reproduce import REPRODUCE_PRESETS, reproduce

    if args.preset not in REPRODUCE_PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}; choose from {sorted(REPRODUCE_PRESETS)}")
    if args.dry_run:
        print(dry_run_plan(args.preset))
        return 0
    from slip_core.config import parse_sets

    result = reproduce(preset=args.preset, store=args.store, source=args.source, subset=args.subset,
                       rebuild=args.rebuild, train_config=parse_sets(args.train_sets) or None,
                       eval_config=parse_sets(args.eval_sets) or None,
                       demo_corpus=parse_sets(args.corpus_sets) or None)
    print(json.dumps(result, indent=2))
    print(f"\nreport: {result['report']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.scheduled import serve_forever

    serve_forever(store=args.store, source=args.source, subset=args.subset,
                  dataset_cron=args.dataset_cron, eval_cron=args.eval_cron)
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from slip_core.artifacts import format_lineage

    print(format_lineage(args.artifact))
    return 0


def register(subparsers, name: str) -> None:
    if name == "reproduce":
        p = subparsers.add_parser(name, help="dataset -> pretrain -> eval as one cached Prefect flow")
        p.add_argument("--preset", default="tiny", help="tiny (the demo) or a paper preset")
        p.add_argument("--store", default=DEFAULT_STORE, help="artifact store root (local folder or s3://...)")
        p.add_argument("--source", default=None, help="metadata/URL table (default: the preset's; tiny builds the demo corpus)")
        p.add_argument("--subset", default=None, help="YFCC subset TSV (line number, photo id, hash)")
        p.add_argument("--rebuild", choices=["dataset", "train", "eval"], default=None,
                       help="force this stage and everything downstream to run again")
        p.add_argument("--dry-run", action="store_true", help="print the plan and compute estimate, run nothing")
        p.add_argument("--train-set", dest="train_sets", action="append", default=[], metavar="KEY=VALUE",
                       help="TrainConfig override for the pretraining stage (repeatable; JSON values)")
        p.add_argument("--eval-set", dest="eval_sets", action="append", default=[], metavar="KEY=VALUE",
                       help="EvalConfig override for the evaluation stage (repeatable; JSON values)")
        p.add_argument("--corpus-set", dest="corpus_sets", action="append", default=[], metavar="KEY=VALUE",
                       help="demo corpus argument, e.g. n_fashion=500 (tiny preset; repeatable)")
        p.set_defaults(func=_reproduce)
    elif name == "serve":
        from flows.scheduled import DATASET_CRON, EVAL_CRON

        p = subparsers.add_parser(name, help="serve scheduled deployments against a running Prefect server")
        p.add_argument("--store", default=DEFAULT_STORE)
        p.add_argument("--source", default=None, help="metadata snapshot to rebuild nightly (omit: eval sweep only)")
        p.add_argument("--subset", default=None)
        p.add_argument("--dataset-cron", default=DATASET_CRON)
        p.add_argument("--eval-cron", default=EVAL_CRON)
        p.set_defaults(func=_serve)
    elif name == "lineage":
        p = subparsers.add_parser(name, help="print an artifact's lineage from its manifests")
        p.add_argument("artifact", help="artifact folder or manifest.json URL")
        p.set_defaults(func=_lineage)
