"""`slip study [--preset tiny] [--seeds 3] [--store STORE] [--set STAGE.KEY=VALUE ...]`: CLIP, SimCLR and SLIP
with N seeds each (and CLIP at SLIP's wall time) on one dataset, every run a cached artifact; prints the
mean ± std table and the report's manifest (flows/study.py). `--set` as for `slip reproduce` (train.*
overrides apply to every method, so the methods keep equal steps)."""
from __future__ import annotations

import argparse
import json

from flows.cli import add_store
from flows.cli_reproduce import stage_overrides


def _study(args: argparse.Namespace) -> int:
    from flows.study import study

    o = stage_overrides(args.sets)
    result = study(preset=args.preset, seeds=args.seeds, store=args.store, train_config=o.get("train"),
                   eval_config=o.get("eval"), demo_corpus=o.get("corpus"), dataset_config=o.get("dataset"),
                   nproc=args.nproc, source=args.source, subset=args.subset)
    print(result["markdown"])
    print(json.dumps({"report": result["report"]}))
    return 0


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="CLIP, SimCLR and SLIP over several seeds: mean ± std per metric")
    p.add_argument("--preset", default="tiny", help="reproduce preset whose dataset and evaluation the study uses")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ... N-1)")
    add_store(p)
    p.add_argument("--source", default=None, help="metadata/URL table (default: the preset's; tiny builds the demo corpus)")
    p.add_argument("--subset", default=None, help="YFCC subset TSV")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage config: dataset.KEY, train.KEY, eval.KEY or corpus.KEY (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="training processes per node")
    p.set_defaults(func=_study)
