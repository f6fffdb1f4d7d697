"""Test corpora for the dataset stage: real images (offline photos, Fashion-MNIST train PNGs) behind a real
HTTP server on 127.0.0.1, plus fault rows. Shared by test_download.py, test_build_dataset_flow.py and
bench/download.py."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass, field

from PIL import Image

from datasets import offline
from datasets.sources.yfcc import format_row

# DatasetConfig overrides for tests: small shards, few processes/threads, short timeout and per-image bounds
# (2 cores; the deadline is above the timeout, so a plain slow answer still fails as "timed out").
TEST_CONFIG = {"number_sample_per_shard": 8, "processes_count": 1, "thread_count": 8, "timeout": 2,
               "download_deadline_s": 4.0, "max_image_bytes": 4 << 20,
               "max_image_area": 4.0e7, "image_size": 64, "resize_mode": "center_crop"}
LONG_TEXT = "a very long description " * 43_690  # ~1 MB


def write_images(img_dir: str, n_photos: int = 6, n_fashion: int = 12) -> list[tuple[str, str, str]]:
    """Real images into img_dir; returns [(relative path, title, description)]."""
    os.makedirs(os.path.join(img_dir, "photos"), exist_ok=True)
    os.makedirs(os.path.join(img_dir, "fmnist"), exist_ok=True)
    out = []
    for p in offline.photo_corpus()[:n_photos]:
        rel = f"photos/{p.name}.jpg"
        Image.open(p.path).convert("RGB").save(os.path.join(img_dir, rel), "JPEG", quality=90)
        out.append((rel, p.title, p.description))
    images, labels = offline.fashion_mnist("train")
    for i in range(n_fashion):
        rel = f"fmnist/{i:05d}.png"
        Image.fromarray(images[i]).save(os.path.join(img_dir, rel))
        c = offline.FASHION_CLASSES[labels[i]]
        out.append((rel, f"a photo of a {c}", f"my new {c}"))
    shutil.copyfile(os.path.join(img_dir, out[0][0]), os.path.join(img_dir, "_slow.jpg"))
    return out


def huge_png(path: str, side: int = 8000) -> None:
    """A real, tiny-on-disk PNG whose pixel area (64M) exceeds max_image_area (decompression-bomb guard)."""
    Image.new("L", (side, side), 128).save(path, optimize=False, compress_level=9)


@dataclass
class Row:
    url: str
    title: bytes | str
    description: str = ""
    in_subset: bool = True
    expect: tuple[str, str] = ("success", "")  # (status, reason substring)
    fault: str = ""  # hostile-input label for the fault table ("" = an ordinary row)
    stage: str = "download"  # the stage that meets the fault: "download" (URL, fetch) or "filter" (metadata)


# Metadata lines the filter must count as malformed (fault label, raw line); write_metadata puts them
# before row `malformed_at`.
BAD_LINES = [
    ("metadata row with 3 of 25 fields", b"0\tthis row is\tmalformed"),
    ("metadata row cut off after 20 of 25 fields",
     "\t".join(format_row(77, 9_999_977, "0" * 32, "cut", "off", "http://x/y.jpg").split("\t")[:20]).encode()),
    ("metadata row with a non-numeric line number",
     format_row(78, 9_999_978, "0" * 32, "bad", "number", "http://x/y.jpg").replace("78", "7B", 1).encode()),
]


@dataclass
class Corpus:
    root: str
    metadata: str
    subset: str
    rows: list[Row]
    keys: dict[str, Row] = field(default_factory=dict)  # dataset key -> row (subset rows only)
    malformed_line: int = -1  # physical line of the first BAD_LINES entry
    bad_lines: dict[str, int] = field(default_factory=dict)  # BAD_LINES label -> physical line


def write_metadata(path: str, subset_path: str, rows: list[Row], malformed_at: int | None = None,
                   n_bad: int = 1) -> Corpus:
    """YFCC100M 25-column metadata (binary, so a non-UTF-8 caption stays raw) + subset TSV; the first
    `n_bad` BAD_LINES go before row `malformed_at`."""
    keys = {}
    phys = 0
    bad_lines = {}
    with open(path, "wb") as fm, open(subset_path, "w") as fs:
        for i, r in enumerate(rows):
            if malformed_at is not None and i == malformed_at:
                for label, line in BAD_LINES[:n_bad]:
                    fm.write(line + b"\n")
                    bad_lines[label] = phys
                    phys += 1
            pid = 9_000_000 + i
            h = hashlib.md5(str(pid).encode()).hexdigest()
            title = r.title if isinstance(r.title, str) else "TITLEPLACEHOLDER"
            line = format_row(i, pid, h, title, r.description, r.url).encode()
            if not isinstance(r.title, str):
                line = line.replace(b"TITLEPLACEHOLDER", r.title)
            fm.write(line + b"\n")
            phys += 1
            if r.in_subset:
                fs.write(f"{i}\t{pid}\t{h}\n")
                keys[f"{i:09d}"] = r
    return Corpus(os.path.dirname(path), path, subset_path, rows, keys, min(bad_lines.values(), default=-1), bad_lines)


def fault_rows(base: str, images: list[tuple[str, str, str]], img_dir: str) -> list[Row]:
    """Good rows for every image plus one row per hostile input, with the expected ledger status and
    (for the fault table) its label and the stage that meets it."""
    rows = [Row(f"{base}/{rel}", t, d) for rel, t, d in images]
    rows[1].title = "caf\xe9 <b>bold</b> photo".encode("latin-1")  # not UTF-8: decoded with U+FFFD, still downloaded
    rows[1].fault, rows[1].stage = "title not valid UTF-8 (latin-1 bytes)", "filter"
    rows.append(Row(f"{base}/{images[2][0]}", "not in the subset", in_subset=False, expect=("absent", ""),
                    fault="row not in the subset", stage="filter"))
    spaced = "a photo of café.jpg"  # CC3M/CC12M-style raw URL: a space and a non-ASCII character
    shutil.copyfile(os.path.join(img_dir, images[0][0]), os.path.join(img_dir, spaced))
    rows.append(Row(f"{base}/{spaced}", "spaces in the url", fault="URL with spaces and non-ASCII (percent-encoded "
                    "before download, as browsers do; the ledger keeps the original)", stage="download"))
    png_b64 = base64.b64encode(open(os.path.join(img_dir, images[-1][0]), "rb").read()).decode()
    deadline = f"download exceeded the {TEST_CONFIG['download_deadline_s']:g} s deadline"
    fail, resize = "failed_to_download", "failed_to_resize"
    rows += [
        Row(f"{base}/_fault/404", "gone", expect=(fail, "HTTP Error 404"), fault="HTTP 404"),
        Row(f"{base}/_fault/500", "server error", expect=(fail, "HTTP Error 500"), fault="HTTP 500"),
        Row(f"{base}/_fault/sleep/8", "too slow", expect=(fail, "timed out"), fault="no answer for 8 s (timeout 2 s)"),
        Row(f"{base}/_fault/html", "an html page", expect=(resize, "Image decoding error"), fault="HTML served as image"),
        Row(f"{base}/_fault/truncated/{images[0][0]}", "cut short", expect=(resize, "Image decoding error"),
            fault="truncated JPEG"),
        Row(f"{base}/_fault/empty", "zero bytes", expect=(resize, "empty response (0 bytes)"), fault="zero-byte body"),
        Row(f"{base}/_fault/loop/0", "redirect loop", expect=(fail, "redirect loop"), fault="redirect loop"),
        Row(f"{base}/huge.png", "huge dimensions", expect=(resize, "image area too large"),
            fault="decompression bomb (8000x8000 PNG, 1 KB)"),
        Row("file://" + os.path.join(img_dir, images[0][0]), "local file", expect=("filtered", "unsupported url scheme 'file'"),
            fault="file:// URL"),
        Row("ftp://127.0.0.1:9/photo.jpg", "ftp file", expect=("filtered", "unsupported url scheme 'ftp'"), fault="ftp:// URL"),
        Row(f"data:image/png;base64,{png_b64}", "inline image", expect=("filtered", "unsupported url scheme 'data'"),
            fault="data: URL (a valid base64 PNG)"),
        Row(f"{base}/_fault/drip/0.5", "dripping", expect=(fail, deadline), fault="slow drip: a body byte every 0.5 s, endless"),
        Row(f"{base}/_fault/dripheaders/0.5", "dripping headers", expect=(fail, deadline),
            fault="slow drip: a header byte every 0.5 s, endless"),
        Row(f"{base}/_fault/endless", "endless", expect=(fail, "response exceeded max_image_bytes"),
            fault="endless body, no Content-Length"),
        Row(f"{base}/_fault/endless/1000000000000", "endless, 1 TB declared",
            expect=(fail, "Content-Length 1000000000000 exceeds max_image_bytes"), fault="endless body, Content-Length 1 TB"),
        Row(f"{base}/_fault/redirect/ftp://127.0.0.1:9/photo.jpg", "to ftp", expect=(fail, "redirect to a non-http(s) URL refused"),
            fault="redirect to ftp://"),
        Row(f"{base}/_fault/redirect/file:///etc/passwd", "to a local file", expect=(fail, "is not allowed"),
            fault="redirect to file://"),
        Row(f"{base}/{images[3][0]}?caption=1mb", "a photo with a long story", LONG_TEXT,
            fault="1 MB description", stage="filter"),
        Row(f"{base}/{images[4][0]}?caption=tags", "<a" * 500_000,
            fault="1 MB title of '<a' repeated (regex backtracking bait)", stage="filter"),
        Row(f"{base}/late.jpg", "appears later", expect=(fail, "HTTP Error 404")),
    ]
    return rows
