"""img2dataset with a bounded fetch: `python -m datasets.img2dataset_bounded <img2dataset CLI flags>
[--download_deadline_s=S] [--max_image_bytes=N]` (both 0 = unbounded, as plain img2dataset).

Why a wrapper: img2dataset 1.47 fetches each image with `urllib.request.urlopen(req, timeout=t).read()`
(img2dataset/downloader.py, download_image). That timeout bounds each socket operation, not the download:
a server that sends a byte every second never times out, and a fast endless body is read into memory until
the worker dies. urlopen's default opener also serves file://, ftp:// and data: URLs and follows redirects to
ftp://. A hostile URL list could hang a build forever, exhaust its memory or read local files.

What changes, and nothing else: in every process that downloads (each multiprocessing worker, each Spark Python
worker) img2dataset's `download_image` is replaced by `fetch()`, which
  - opens http:// and https:// only, redirect targets included (anything else is an error, not a fetch);
  - gives each image a total deadline: a watchdog shuts the connection's socket down, which wakes a read
    blocked in any phase after connect (status line, headers, body); connect itself is bounded by `timeout`;
  - reads the body in chunks and stops past max_image_bytes (a larger Content-Length is refused unread);
  - reads the image's dimensions from its header (PIL, nothing decoded) and refuses more than max_image_pixels:
    img2dataset decodes with cv2 *before* its own max_image_area check, so a 1 KB PNG declaring 50000x50000
    would allocate 7.5 GB in a download thread. A body PIL cannot identify is passed on (img2dataset then
    records its decode error as failed_to_resize).
It returns what download_image returns, so a failure becomes img2dataset's status failed_to_download with our
message as the reason (datasets/ledger.py). Reading, sharding, resizing, writing, stats and incremental mode
stay img2dataset's.

How it reaches the workers: img2dataset builds one Downloader in the driver and pickles it to each worker;
we make that a BoundedDownloader, which carries the limits and installs fetch() in the worker before a shard
starts. datasets/img2dataset_spark.py runs img2dataset through run() as well, so both distributors download
the same way (tests/test_scale_spark.py compares their outputs).
"""
from __future__ import annotations

import functools
import http.client
import importlib
import io
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which asks PyPI
from img2dataset import downloader as i2d_downloader  # noqa: E402
from PIL import Image  # noqa: E402

from slip_core import procs  # noqa: E402

HTTP_SCHEMES = ("http", "https")
CHUNK_BYTES = 1 << 16
# img2dataset's User-Agent (downloader.download_image), so servers see the same client either way.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
LIMIT_FLAGS = {"download_deadline_s": float, "max_image_bytes": int, "max_image_pixels": int}


@dataclass(frozen=True)
class Limits:
    deadline_s: float = 0.0  # total seconds per download attempt, redirects included; 0 = none
    max_bytes: int = 0  # response body bytes per image; 0 = none
    max_pixels: int = 0  # width * height from the image header; 0 = none


class _Watchdog:
    """Shuts down the sockets of one download when its deadline passes (one timer thread per download)."""

    def __init__(self, seconds: float):
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire) if seconds > 0 else None
        if self._timer:
            self._timer.daemon = True
            self._timer.start()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            fired = self.fired
        if fired:  # connected after the deadline (connect is bounded by the per-operation timeout only)
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for s in socks:
            _shutdown(s)

    def cancel(self) -> None:
        if self._timer:
            self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    # shutdown, not close: it wakes a recv blocked in another thread; urllib closes the socket itself.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Tracked:
    """Connection mixin: hands the connected socket (after the TLS handshake for https) to the watchdog."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def connect(self):
        super().connect()
        self._watchdog.track(self.sock)


class _HTTPConnection(_Tracked, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, watchdog=self._watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, watchdog=self._watchdog), req, context=self._context)


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib itself refuses redirects to file: and data:, but follows them to ftp:."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in HTTP_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL refused ({scheme}:)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urlopen's default opener minus the file, ftp and data handlers (UnknownHandler answers those)."""
    opener = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTPHandler(watchdog),
              _HTTPSHandler(watchdog), urllib.request.HTTPDefaultErrorHandler(), _HTTPOnlyRedirects(),
              urllib.request.HTTPErrorProcessor()):
        opener.add_handler(h)
    return opener


def fetch(row, timeout, user_agent_token, disallowed_header_directives, *, limits: Limits):
    """img2dataset's download_image contract: (key, BytesIO, None) or (key, None, error message)."""
    key, url = row
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in HTTP_SCHEMES:
        return key, None, f"unsupported url scheme '{scheme}'"
    ua = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)" if user_agent_token else "")
    watchdog = _Watchdog(limits.deadline_s)
    deadline_msg = f"download exceeded the {limits.deadline_s:g} s deadline"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": ua})
        with _opener(watchdog).open(request, timeout=timeout) as r:
            if disallowed_header_directives and i2d_downloader.is_disallowed(r.headers, user_agent_token,
                                                                             disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            declared = (r.headers.get("Content-Length") or "").strip()
            if limits.max_bytes and declared.isdigit() and int(declared) > limits.max_bytes:
                return key, None, f"Content-Length {declared} exceeds max_image_bytes ({limits.max_bytes})"
            buf = io.BytesIO()
            while True:
                want = CHUNK_BYTES if not limits.max_bytes else min(CHUNK_BYTES, limits.max_bytes + 1 - buf.tell())
                chunk = r.read1(want)
                if not chunk:
                    break
                buf.write(chunk)
                if limits.max_bytes and buf.tell() > limits.max_bytes:
                    return key, None, f"response exceeded max_image_bytes ({limits.max_bytes})"
            if watchdog.fired:  # the shut-down socket reads as end of body
                return key, None, deadline_msg
            if r.length:  # urlopen().read() raises this for a body cut short; read1 just stops
                raise http.client.IncompleteRead(buf.getvalue(), r.length)
        too_large = _too_many_pixels(buf, limits.max_pixels)
        if too_large:
            return key, None, too_large
        buf.seek(0)
        return key, buf, None
    except Exception as err:  # noqa: BLE001 - as img2dataset: every failure becomes the row's error message
        return key, None, deadline_msg if watchdog.fired else str(err)
    finally:
        watchdog.cancel()


def _too_many_pixels(buf: io.BytesIO, max_pixels: int) -> str | None:
    """An error message when the header declares more than max_pixels pixels (only the header is parsed)."""
    if not max_pixels:
        return None
    buf.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(buf) as im:
                pixels, shown = im.size[0] * im.size[1], "{}x{} = {}".format(*im.size, im.size[0] * im.size[1])
    except Image.DecompressionBombError as e:  # PIL's own (global) limit hit first; its message has the count
        found = re.search(r"\((\d+) pixels\)", str(e))
        if not found:
            return f"image header over PIL's decompression-bomb limit: {e}"
        pixels = int(found.group(1))
        shown = str(pixels)
    except Exception:  # noqa: BLE001 - not an image PIL knows: img2dataset's decoder reports it
        return None
    if pixels > max_pixels:
        return f"image header declares {shown} pixels, over max_image_pixels ({max_pixels})"
    return None


class BoundedDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader, downloading with fetch() under `limits` in whichever process runs it."""

    def __init__(self, *args, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits

    def download_shard(self, row):
        _follow_parent_once()  # a pool worker: it must not outlive img2dataset's main process
        # download_image is looked up as a module global at every call (download_image_with_retry), so this
        # replaces it for the shard's whole thread pool; one process only ever runs one Downloader's limits.
        i2d_downloader.download_image = functools.partial(fetch, limits=self.limits)
        return super().download_shard(row)


_FOLLOWING: list[bool] = []


def _follow_parent_once() -> None:
    if not _FOLLOWING:
        _FOLLOWING.append(True)
        procs.follow_parent(graceful=False)


def split_limit_flags(argv: list[str]) -> tuple[list[str], Limits]:
    """Our flags out of an img2dataset command line (img2dataset's fire CLI would reject them)."""
    rest, values = [], {}
    for a in argv:
        name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if eq and name in LIMIT_FLAGS:
            values[name] = LIMIT_FLAGS[name](value)
        else:
            rest.append(a)
    return rest, Limits(values.get("download_deadline_s", 0.0), values.get("max_image_bytes", 0),
                        values.get("max_image_pixels", 0))


def run(argv: list[str]) -> None:
    """img2dataset's CLI (`img2dataset.main.download` through fire), with BoundedDownloader as its Downloader."""
    import fire

    i2d_main = importlib.import_module("img2dataset.main")  # the module: the package exports a `main` function

    argv, limits = split_limit_flags(argv)
    i2d_main.Downloader = functools.partial(BoundedDownloader, limits=limits)
    fire.Fire(i2d_main.download, command=argv, name="img2dataset")


def main(argv: list[str] | None = None) -> int:
    # We lead img2dataset's process group: when our parent (the dataset stage) dies, or SIGTERM comes,
    # the whole group goes at once, pool workers included (img2dataset has no graceful stop; a shard
    # without its _stats.json is redone on resume).
    procs.follow_parent(graceful=False)
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy: the workers unpickle BoundedDownloader by its
    # module name, which must be datasets.img2dataset_bounded.
    from datasets.img2dataset_bounded import main as _main

    sys.exit(_main())
