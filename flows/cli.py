"""`slip` command line: one sub-command per pipeline stage.

Each stage's arguments live next to its flow (flows/cli_<stage>.py, function `register(subparsers)`),
and are imported only when that stage is asked for, so `slip --help` stays fast. Every command that
reads or writes artifacts takes the same `--store` (default $SLIP_STORE or ./out/store), and uses a
running `slip server start` Prefect server when it finds one, else a temporary one that dies with the command
(flows/prefect_server.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# stage -> (module providing register(subparsers), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "dataset": ("flows.cli_dataset", "YFCC100M/CC metadata -> cleaned caption table -> webdataset shards"),
    "train": ("flows.cli_train", "pretrain CLIP / SimCLR / SLIP on a dataset manifest (torchrun)"),
    "eval": ("flows.cli_eval", "zero-shot, linear probe, fine-tune and retrieval evaluation"),
    "export": ("flows.cli_export", "checkpoint -> open_clip local-dir folder; eval results -> CLIP_benchmark JSON"),
    "reproduce": ("flows.cli_reproduce", "the whole chain as one cached Prefect flow (dataset -> train -> eval)"),
    "study": ("flows.cli_study", "CLIP, SimCLR and SLIP over several seeds (and CLIP at SLIP's wall time): mean ± std"),
    "serve": ("flows.cli_reproduce", "register scheduled deployments (nightly rebuild, eval new checkpoints)"),
    "status": ("flows.cli_reproduce", "per stage: cached (artifact) or will run (why), for a reproduce preset"),
    "lineage": ("flows.cli_reproduce", "print the lineage of an artifact from its manifests"),
    "server": ("flows.cli_server", "start / stop a persistent local Prefect server (SQLite, 127.0.0.1)"),
    "bench": ("flows.cli_bench", "run the benchmarks in bench/ (one JSON line each)"),
}
NO_PREFECT = {"status", "lineage", "server", "bench"}  # commands that never talk to a Prefect server


def add_store(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """The one `--store` flag (default $SLIP_STORE or ./out/store); `aliases`: deprecated spellings."""
    from slip_core.store import default_root

    parser.add_argument("--store", dest="store", default=None,
                        help="artifact store root (local folder or s3://...); default $SLIP_STORE or ./out/store")
    for alias in aliases:
        parser.add_argument(alias, dest="store_alias", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(store_default=default_root())


def store_of(args: argparse.Namespace) -> str:
    """The store a command was given; a deprecated alias (e.g. `slip train --out`) still works, with a warning."""
    alias = getattr(args, "store_alias", None)
    if alias and not args.store:
        print("warning: --out is deprecated, use --store", file=sys.stderr)
        return alias
    return args.store or args.store_default


def _defaults_env() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slip",
        description="slip-pipeline: rebuild YFCC15M from raw URLs, pretrain CLIP/SimCLR/SLIP, evaluate.",
        epilog="stages:\n" + "\n".join(f"  {name:<10} {desc}" for name, (_, desc) in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (module, desc) in STAGES.items():
        if stage is not None and name == stage:
            importlib.import_module(module).register(sub, name)
        else:
            sub.add_parser(name, help=desc, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    _defaults_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv[0] if argv and argv[0] in STAGES else None
    parser = build_parser(stage)
    if stage is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    args = parser.parse_args(argv)
    args.cli_argv = argv  # a command may rerun itself, e.g. under torchrun
    if not hasattr(args, "func"):
        parser.parse_args([stage, "--help"])
        return 2
    if hasattr(args, "store_default"):
        args.store = store_of(args)
    no_server: tuple[type[Exception], ...] = ()
    if stage not in NO_PREFECT:
        from flows import prefect_server

        prefect_server.connect(getattr(args, "store", None))
        no_server = (prefect_server.ServerUnavailable,)
    from slip_core.config import ConfigError

    try:
        result = args.func(args)
    except ConfigError as e:  # a typo in --set or a config file: say so, no traceback
        print(f"slip {stage}: invalid configuration: {e}", file=sys.stderr)
        return 2
    except no_server as e:  # the temporary Prefect server did not come up: say where its log is
        print(f"slip {stage}: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
