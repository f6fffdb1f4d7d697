"""`slip train --dataset MANIFEST --preset tiny --out STORE [--nproc N] [--set key=value ...] [--resume latest]`."""
from __future__ import annotations

import argparse
import json
import os

DEFAULT_STORE = os.environ.get("SLIP_STORE", os.path.join(os.getcwd(), "out", "store"))


def _train(args: argparse.Namespace) -> int:
    from flows.pretrain import make_config, pretrain
    from slip_core.config import parse_sets

    overrides = parse_sets(args.sets)
    make_config(args.preset, overrides)  # fail fast on a typo, before Prefect starts
    url = pretrain(dataset=args.dataset, store=args.out, config=overrides or None, preset=args.preset,
                   nproc=args.nproc, timeout_s=args.timeout, retries=args.retries, resume=args.resume)
    print(json.dumps({"checkpoint": url}))
    return 0


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="pretrain CLIP / SimCLR / SLIP on a dataset manifest (torchrun)",
                              description="Launch torchrun from a Prefect flow; publish a checkpoint artifact.")
    p.add_argument("--dataset", required=True, help="dataset manifest URL (or its folder)")
    p.add_argument("--preset", default="tiny",
                   help="tiny | clip_tiny | simclr_tiny (CPU demo) or <slip|clip|simclr>_<vits16|vitb16|vitl16>_"
                        "<yfcc15m_25ep|yfcc15m_50ep|yfcc15m_100ep|cc3m_40ep|cc12m_35ep> (paper recipes)")
    p.add_argument("--out", default=DEFAULT_STORE, help="artifact store root (local folder or s3://...)")
    p.add_argument("--nproc", type=int, default=1, help="processes per node (GPUs, or CPU ranks with gloo)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override, value parsed as JSON when possible (repeatable)")
    p.add_argument("--resume", choices=["latest", "none"], default="latest",
                   help="latest: continue an interrupted run of the same config; none: start over")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the run is killed (per attempt)")
    p.add_argument("--retries", type=int, default=1, help="Prefect retries; each resumes from the last checkpoint")
    p.set_defaults(func=_train)
