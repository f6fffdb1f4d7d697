"""`slip train --dataset MANIFEST --preset tiny --store STORE [--nproc N] [--set key=value ...]
[--resume latest|none] [--resume-from ARTIFACT_OR_CHECKPOINT]`."""
from __future__ import annotations

import argparse
import json
import sys

from flows.cli import add_store


def _train(args: argparse.Namespace) -> int:
    from flows.pretrain import make_config, pretrain
    from slip_core.config import parse_sets

    overrides = parse_sets(args.sets)
    make_config(args.preset, overrides)  # fail fast on a typo, before Prefect starts
    launcher = launcher_config(args)
    if args.resume_from:  # and on a --resume-from that names no resume checkpoint
        from flows.pretrain import resume_checkpoint
        from slip_core import artifacts
        from slip_core.store import Store

        try:
            resume_checkpoint(args.resume_from, Store(args.store))
        except (FileNotFoundError, ValueError, artifacts.ManifestError) as e:
            print(f"slip train: {e}", file=sys.stderr)
            return 2
    url = pretrain(dataset=args.dataset, store=args.store, config=overrides or None, preset=args.preset,
                   nproc=args.nproc, timeout_s=args.timeout, retries=args.retries, resume=args.resume,
                   resume_from=args.resume_from, launcher=launcher)
    print(json.dumps({"checkpoint": url}))
    return 0


def launcher_config(args: argparse.Namespace) -> dict | None:
    """--launcher KIND --launcher-set KEY=VALUE ... -> the flow's `launcher` config, checked (ConfigError: exit 2)."""
    from flows import launch_pool  # noqa: F401  (registers the work-pool launcher)
    from slip_core.config import parse_sets
    from slip_core.launchers import resolve_launcher

    if args.launcher is None and not args.launcher_sets:
        return None
    config = {"kind": args.launcher or "local", **parse_sets(args.launcher_sets)}
    resolve_launcher(config)
    return config


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="pretrain CLIP / SimCLR / SLIP on a dataset manifest (torchrun)",
                              description="Launch torchrun from a Prefect flow; publish a checkpoint artifact.")
    p.add_argument("--dataset", required=True, help="dataset manifest URL (or its folder)")
    p.add_argument("--preset", default="tiny",
                   help="tiny | clip_tiny | simclr_tiny (CPU demo) or <slip|clip|simclr>_<vits16|vitb16|vitl16>_"
                        "<yfcc15m_25ep|yfcc15m_50ep|yfcc15m_100ep|cc3m_40ep|cc12m_35ep> (paper recipes)")
    add_store(p, "--out")
    p.add_argument("--nproc", type=int, default=1, help="processes per node (GPUs, or CPU ranks with gloo)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override, value parsed as JSON when possible (repeatable)")
    p.add_argument("--resume", choices=["latest", "none"], default="latest",
                   help="latest: continue an interrupted run of the same identity; none: start over")
    p.add_argument("--resume-from", default=None, metavar="ARTIFACT_OR_CHECKPOINT",
                   help="continue from another run's checkpoint (a run's checkpoints/step_N.pt, its run folder, or "
                        "its stage folder) although this run has a different identity, e.g. after a logging fix; "
                        "recorded in the checkpoint's lineage as resumed_from")
    p.add_argument("--launcher", default=None, metavar="KIND",
                   help="where the ranks run: local (torchrun here, default) | slurm (submitit) | work-pool (a Prefect "
                        "deployment); an execution setting, not part of the checkpoint's identity (infra/README.md)")
    p.add_argument("--launcher-set", dest="launcher_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="launcher setting, e.g. partition=gpu nodes=8 (slurm), pool=slip-process (work-pool)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the run is killed (per attempt)")
    p.add_argument("--retries", type=int, default=1, help="Prefect retries; each resumes from the last checkpoint")
    p.set_defaults(func=_train)
