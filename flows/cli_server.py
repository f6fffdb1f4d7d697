"""`slip server start|stop|status [--store STORE] [--port 4200]`: a persistent local Prefect server.

With `--store`, its SQLite database, log and pid file live in the store's `.prefect/` folder; without, in
$PREFECT_HOME (default ~/.prefect). Other `slip` commands given the same store (or none) use it while it
runs, instead of starting Prefect's ephemeral server each time (flows/prefect_server.py).
"""
from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from flows import prefect_server as ps

    home = ps.home(args.store)
    if args.action == "start":
        try:
            info, started = ps.start(home, port=args.port)
        except RuntimeError as e:
            print(f"slip server: {e}", file=sys.stderr)
            return 1
        what = "started" if started else "already running"
        print(f"Prefect server {what}: {info['url']} (pid {info['pid']}, home {home})")
        print(f"slip commands for this store use it; elsewhere: export PREFECT_API_URL={info['url']}")
        return 0
    if args.action == "stop":
        info = ps.stop(home)
        print(f"Prefect server stopped (pid {info['pid']}, {info['url']})" if info
              else f"no Prefect server running for {home}")
        return 0
    info = ps.state(home)
    print(f"running: {info['url']} (pid {info['pid']}, home {home})" if info else f"not running ({home})")
    return 0 if info else 1


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="start / stop a persistent local Prefect server (SQLite, 127.0.0.1)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--store", default=None, help="keep the server's database in this store's .prefect/ folder")
    p.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (0: any free port)")
    p.set_defaults(func=_run)
