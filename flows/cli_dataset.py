"""`slip dataset ...`: filter-yfcc, build, demo-corpus.

    slip dataset filter-yfcc --metadata M --subset S --output OUT.parquet [--mode slip|strict]
    slip dataset build SOURCE [--store STORE] [--subset S] [--preset yfcc15m|cc3m|cc12m|tiny]
                       [--set image_size=128 ...] [--retry-failed] [--no-prefect]
    slip dataset demo-corpus OUT_DIR [--n-fashion 3000] [--seed 0] [--port 18765] [--store STORE]
    slip dataset gc --store STORE [--delete] [--min-age-s 3600]

Every path may be an fsspec URL (s3://..., file://...).
"""
from __future__ import annotations

import argparse
import json
import sys

from flows.cli import add_store
from slip_core.config import parse_sets


def _filter(a) -> int:
    from datasets.sources import BadInput, yfcc

    try:
        report = yfcc.filter_yfcc(a.metadata, a.output, subset=a.subset, mode=a.mode, line_offset=a.line_offset)
    except BadInput as e:  # one line naming the file and what is wrong; no output file
        print(f"slip dataset filter-yfcc: {e}", file=sys.stderr)
        return 2
    d = report.to_dict()
    d["malformed_lines"] = d["malformed_lines"][:20]
    print(json.dumps(d, indent=1))
    return 0


def _build(a) -> int:
    from datasets.config import make_config

    config = parse_sets(a.set)
    cfg = make_config(config, a.preset)  # fail before Prefect starts
    from datasets import pipeline
    from datasets.sources import BadInput

    try:  # the caption table first, here: bad input is one line on stderr, not a task traceback
        pipeline.prepare_table(a.source, a.store, cfg, a.subset)
        if a.no_prefect:
            print(pipeline.build(a.source, a.store, cfg, a.subset, a.retry_failed, progress=True))
            return 0
    except BadInput as e:
        print(f"slip dataset build: {e}", file=sys.stderr)
        return 2
    from flows.build_dataset import build_dataset

    print(build_dataset(a.source, a.store, config=config, preset=a.preset, subset=a.subset,
                        retry_failed=a.retry_failed, progress=True))
    return 0


def _demo(a) -> int:
    from datasets.demo_corpus import DEFAULT_PORT, build_demo_corpus

    corpus = build_demo_corpus(a.out_dir, n_fashion=a.n_fashion, seed=a.seed, port=a.port or DEFAULT_PORT)
    print(json.dumps(corpus.__dict__, indent=1))
    store = a.store or a.build
    if a.build and not a.store:
        print("warning: --build STORE is deprecated, use --store STORE", file=sys.stderr)
    if store:
        from flows.build_dataset import build_dataset

        with corpus.serve():
            print(build_dataset(corpus.metadata, store, preset="tiny", subset=corpus.subset, progress=True))
    return 0


def _gc(a) -> int:
    from datasets import gc

    report = gc.collect(a.store, delete=a.delete, min_age_s=a.min_age_s)
    for url in report["unreferenced"]:
        print(url)
    verb = "deleted" if a.delete else "unreferenced (rerun with --delete to remove)"
    print(f"{len(report['unreferenced'])} shard(s), {report['bytes']} bytes {verb}; "
          f"{report['referenced']} shard(s) referenced by published versions")
    return 0


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="YFCC100M/CC metadata -> cleaned caption table -> webdataset shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset_cmd", metavar="COMMAND")

    f = sub.add_parser("filter-yfcc", help="YFCC100M metadata + OpenAI subset -> cleaned caption parquet")
    f.add_argument("--metadata", required=True, help="yfcc100m_dataset (plain or .bz2), 25 or 23 columns")
    f.add_argument("--subset", help="yfcc100m_subset_data.tsv (omit to keep every well-formed row)")
    f.add_argument("--output", required=True, help="output parquet")
    f.add_argument("--mode", choices=["slip", "strict"], default="slip",
                   help="slip: reference-exact cleaning (default); strict: + entities, whitespace, drop empty")
    f.add_argument("--line-offset", type=int, default=0, help="line number of the first row (23-column split parts)")
    f.set_defaults(func=_filter)

    b = sub.add_parser("build", help="metadata or url+caption table -> verified webdataset shards (Prefect flow)")
    b.add_argument("source", help="YFCC100M metadata, CC3M/CC12M TSV, or any parquet/csv/tsv with url+caption")
    add_store(b)
    b.add_argument("--subset", help="OpenAI subset TSV (YFCC only)")
    b.add_argument("--preset", default="yfcc15m", help="yfcc15m | cc3m | cc12m | tiny")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="DatasetConfig override (repeatable)")
    b.add_argument("--retry-failed", action="store_true", help="retry only failed rows and merge the result")
    b.add_argument("--no-prefect", action="store_true", help="run the same steps without Prefect")
    b.set_defaults(func=_build)

    d = sub.add_parser("demo-corpus", help="write the demo corpus (real photos + Fashion-MNIST train, YFCC format)")
    d.add_argument("out_dir")
    d.add_argument("--n-fashion", type=int, default=3000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--port", type=int, default=None)
    d.add_argument("--store", default=None, help="also serve it and build the tiny dataset into this artifact store")
    d.add_argument("--build", metavar="STORE", default=None, help=argparse.SUPPRESS)  # deprecated: --store
    d.set_defaults(func=_demo)

    g = sub.add_parser("gc", help="list (or --delete) shards no published dataset version references")
    g.add_argument("--store", required=True)
    g.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    g.add_argument("--min-age-s", type=float, default=3600.0,
                   help="never touch shards younger than this (a build may be publishing them)")
    g.set_defaults(func=_gc)

    def _no_cmd(a) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_no_cmd)
