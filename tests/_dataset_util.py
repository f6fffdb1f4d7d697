"""Test corpora for the dataset stage: real images (offline photos, Fashion-MNIST train PNGs) behind a real
HTTP server on 127.0.0.1, plus fault rows. Shared by test_download.py, test_build_dataset_flow.py and
bench/download.py."""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field

from PIL import Image

from datasets import offline
from datasets.yfcc import format_row

# DatasetConfig overrides for tests: small shards, few processes/threads, short timeout (2 cores).
TEST_CONFIG = {"number_sample_per_shard": 8, "processes_count": 1, "thread_count": 8, "timeout": 2,
               "max_image_area": 4.0e7, "image_size": 64, "resize_mode": "center_crop"}


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


@dataclass
class Corpus:
    root: str
    metadata: str
    subset: str
    rows: list[Row]
    keys: dict[str, Row] = field(default_factory=dict)  # dataset key -> row (subset rows only)
    malformed_line: int = -1


def write_metadata(path: str, subset_path: str, rows: list[Row], malformed_at: int | None = None) -> Corpus:
    """YFCC100M 25-column metadata (binary, so a non-UTF-8 caption stays raw) + subset TSV."""
    keys = {}
    phys = 0
    malformed_line = -1
    with open(path, "wb") as fm, open(subset_path, "w") as fs:
        for i, r in enumerate(rows):
            if malformed_at is not None and i == malformed_at:
                fm.write(b"0\tthis row is\tmalformed\n")
                malformed_line = phys
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
    return Corpus(os.path.dirname(path), path, subset_path, rows, keys, malformed_line)


def fault_rows(base: str, images: list[tuple[str, str, str]], img_dir: str) -> list[Row]:
    """Good rows for every image plus one row per failure mode, with the expected ledger status."""
    rows = [Row(f"{base}/{rel}", t, d) for rel, t, d in images]
    rows[1].title = "caf\xe9 <b>bold</b> photo".encode("latin-1")  # not UTF-8: decoded with U+FFFD, still downloaded
    rows.append(Row(f"{base}/{images[2][0]}", "not in the subset", in_subset=False, expect=("absent", "")))
    rows += [
        Row(f"{base}/_fault/404", "gone", expect=("failed_to_download", "HTTP Error 404")),
        Row(f"{base}/_fault/500", "server error", expect=("failed_to_download", "HTTP Error 500")),
        Row(f"{base}/_fault/sleep/8", "too slow", expect=("failed_to_download", "timed out")),
        Row(f"{base}/_fault/html", "an html page", expect=("failed_to_resize", "Image decoding error")),
        Row(f"{base}/_fault/truncated/{images[0][0]}", "cut short", expect=("failed_to_resize", "Image decoding error")),
        Row(f"{base}/_fault/empty", "zero bytes", expect=("failed_to_resize", "empty response (0 bytes)")),
        Row(f"{base}/_fault/loop/0", "redirect loop", expect=("failed_to_download", "redirect loop")),
        Row(f"{base}/huge.png", "huge dimensions", expect=("failed_to_resize", "image area too large")),
        Row("file://" + os.path.join(img_dir, images[0][0]), "local file", expect=("filtered", "unsupported url scheme 'file'")),
        Row(f"{base}/late.jpg", "appears later", expect=("failed_to_download", "HTTP Error 404")),
    ]
    return rows
