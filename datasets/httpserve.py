"""A real, threaded HTTP server on 127.0.0.1 serving a folder (demo corpus, tests, benchmarks).

`serve_directory(path)` is a context manager yielding the base URL (no trailing slash). With
`faults=True` it also answers a few misbehaving endpoints under `/_fault/`, so tests exercise the real
failure paths of the download stage (img2dataset with our bounded fetch, datasets/img2dataset_bounded.py):

    /_fault/404  /_fault/500         HTTP errors
    /_fault/sleep/<seconds>          answers only after a delay (client timeout)
    /_fault/html                     200 text/html instead of an image
    /_fault/empty                    200 image/jpeg with zero bytes
    /_fault/truncated/<file>         the first third of <file> from the folder
    /_fault/loop/<n>                 302 to /_fault/loop/<n+1>, forever (redirect loop)
    /_fault/noai/<file>              <file> with an `X-Robots-Tag: noai` header
    /_fault/drip/<seconds>           200 image/jpeg, then one body byte every <seconds>, endlessly
    /_fault/dripheaders/<seconds>    the status line, then one header byte every <seconds>, endlessly
    /_fault/endless                  200 image/jpeg without Content-Length, bytes as fast as they go, endlessly
    /_fault/endless/<n>              the same, declaring `Content-Length: <n>`
    /_fault/redirect/<url>           302 to <url>, taken verbatim (e.g. /_fault/redirect/ftp://127.0.0.1:9/x.jpg)

The endless answers stop only when the client hangs up or the server shuts down.
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

    def _stream(self, piece: bytes, every_s: float, headers: dict) -> None:
        """A 200 image/jpeg whose body is `piece` repeated (every `every_s` seconds) until the client leaves."""
        with contextlib.suppress(OSError):  # the client gave up: BrokenPipe / ConnectionReset
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            while not self.server.stopping.wait(every_s):
                self.wfile.write(piece)

    def _drip_headers(self, every_s: float) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Drip: ")
            while not self.server.stopping.wait(every_s):
                self.wfile.write(b"a")

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
            elif what == "drip":
                self._stream(b"\xff", float(arg or 0.5), {"Content-Length": "100000"})
            elif what == "dripheaders":
                self._drip_headers(float(arg or 0.5))
            elif what == "endless":
                self._stream(b"\0" * (1 << 16), 0.0, {"Content-Length": arg} if arg else {})
            elif what == "redirect":
                self.send_response(302)
                self.send_header("Location", arg)
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
    server.hits, server.hits_lock, server.stopping = hits, threading.Lock(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()  # ends endless fault answers still streaming
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
