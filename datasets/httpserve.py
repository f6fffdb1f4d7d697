"""A real, threaded HTTP server on 127.0.0.1 serving a folder (demo corpus, tests, benchmarks).

`serve_directory(path)` is a context manager yielding the base URL (no trailing slash). With
`faults=True` it also answers a few misbehaving endpoints under `/_fault/`, so tests exercise the real
failure paths of img2dataset's urllib downloader:

    /_fault/404  /_fault/500         HTTP errors
    /_fault/sleep/<seconds>          answers only after a delay (client timeout)
    /_fault/html                     200 text/html instead of an image
    /_fault/empty                    200 image/jpeg with zero bytes
    /_fault/truncated/<file>         the first third of <file> from the folder
    /_fault/loop/<n>                 302 to /_fault/loop/<n+1>, forever (redirect loop)
    /_fault/noai/<file>              <file> with an `X-Robots-Tag: noai` header
"""
from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import os
import threading
import time
from typing import Iterator


class _Handler(http.server.SimpleHTTPRequestHandler):
    faults = False

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests and the demo read their own logs
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream", headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _file(self, rel: str) -> bytes:
        path = os.path.join(self.directory, os.path.normpath(rel).lstrip("/."))
        with open(path, "rb") as f:
            return f.read()

    def do_GET(self):  # noqa: N802
        hits = getattr(self.server, "hits", None)
        if hits is not None:
            with self.server.hits_lock:
                hits[self.path] += 1
        if not (self.faults and self.path.startswith("/_fault/")):
            return super().do_GET()
        parts = self.path.split("?", 1)[0].split("/", 3)[2:]
        what, arg = parts[0], (parts[1] if len(parts) > 1 else "")
        try:
            if what in ("404", "500"):
                self._send(int(what), b"error page", "text/html")
            elif what == "sleep":
                time.sleep(float(arg or 30))
                self._send(200, self._file("_slow.jpg") if os.path.exists(os.path.join(self.directory, "_slow.jpg")) else b"", "image/jpeg")
            elif what == "html":
                self._send(200, b"<!doctype html><html><body><h1>Not an image</h1></body></html>", "text/html")
            elif what == "empty":
                self._send(200, b"", "image/jpeg")
            elif what == "truncated":
                data = self._file(arg)
                self._send(200, data[: max(1, len(data) // 3)], "image/jpeg")
            elif what == "loop":
                self.send_response(302)
                self.send_header("Location", f"/_fault/loop/{int(arg or 0) + 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif what == "noai":
                self._send(200, self._file(arg), "image/jpeg", {"X-Robots-Tag": "noai"})
            else:
                self._send(404, b"unknown fault", "text/plain")
        except FileNotFoundError:
            self._send(404, b"no such file", "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128


@contextlib.contextmanager
def serve_directory(path: str, faults: bool = False, port: int = 0,
                    hits: "collections.Counter | None" = None) -> Iterator[str]:
    """Serve `path` on 127.0.0.1 (a free port unless given) until the block exits; yields the base URL.
    `hits`, if given, counts GET requests per request path (tests use it to prove no URL is fetched twice)."""
    handler = functools.partial(type("H", (_Handler,), {"faults": faults}), directory=os.path.abspath(path))
    server = _Server(("127.0.0.1", port), handler)
    server.hits, server.hits_lock = hits, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main() -> None:
    """`python -m datasets.httpserve DIR [--faults] [--port N]`: serve until interrupted."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    with serve_directory(a.directory, a.faults, a.port) as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
