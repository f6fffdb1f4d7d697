"""Check that the Prefect UI renders a pipeline flow run: start `prefect server start` on 127.0.0.1 over
the demo's Prefect home, find the latest `reproduce` flow run through the REST API, load its page in
headless Chromium (Debian `chromium`), screenshot it, and check the rendered DOM names the run.

    .venv/bin/python tests/ui_screenshot.py [--prefect-home .prefect] [--out out/ui-flow-run.png]

Prints one JSON line; exits non-zero if the page did not render the run. Needs `apt-get install chromium`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefect-home", default=os.environ.get("PREFECT_HOME", ".prefect"))
    ap.add_argument("--flow", default="reproduce")
    ap.add_argument("--out", default="out/ui-flow-run.png")
    a = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": os.path.abspath(a.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(120):
            try:
                _api(base, "/health")
                break
            except OSError:
                time.sleep(1)
        flows = _api(base, "/flows/filter", {"flows": {"name": {"any_": [a.flow]}}, "limit": 1})
        if not flows:
            raise SystemExit(f"no flow named {a.flow!r} in {a.prefect_home}: run `make demo` first")
        runs = _api(base, "/flow_runs/filter", {"flows": {"id": {"any_": [flows[0]["id"]]}},
                                                "sort": "START_TIME_DESC", "limit": 1})
        run = runs[0]
        url = f"http://127.0.0.1:{port}/runs/flow-run/{run['id']}"
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            flags = CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]
            subprocess.run([chromium, *flags, f"--screenshot={os.path.abspath(a.out)}", url],
                           capture_output=True, timeout=120)
            dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        ok = run["name"] in dom and os.path.getsize(a.out) > 10_000
        print(json.dumps({"name": "prefect_ui_flow_run_page", "ok": ok, "flow_run": run["name"],
                          "state": run.get("state_type"), "url": url, "screenshot": a.out,
                          "screenshot_bytes": os.path.getsize(a.out), "dom_chars": len(dom)}))
        return 0 if ok else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
