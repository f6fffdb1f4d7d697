"""The demo corpus: real images behind YFCC100M-format metadata, served by a local HTTP server.

`make demo` runs the real YFCC path end to end on it: 25-column metadata with URL-encoded titles and
descriptions (some with <a href>, <b>, links, to exercise SLIP's cleaning), OpenAI-style subset TSV
(line number, photo id, hash) that leaves some rows out, one malformed line, a few dead links, and
download URLs pointing at `serve_directory(corpus.image_dir, port=corpus.port)`.

Images (OFFLINE_DATA.md §1): the 20 real photos from our dependencies' wheels, and N Fashion-MNIST
TRAIN images (balanced over the 10 classes) saved as PNG; the Fashion-MNIST TEST split is never used
here, it is the held-out zero-shot set. Captions put the class word in the title and/or the description
in varied phrasings, like Flickr users would.
The port is fixed (default 18765, env SLIP_DEMO_PORT) so the metadata - and therefore every cache key
downstream - is identical from one demo run to the next.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

from datasets.httpserve import serve_directory

DEFAULT_PORT = int(os.environ.get("SLIP_DEMO_PORT", "18765"))
FORMAT_VERSION = 1

TITLES = ["a photo of a {c}", "my {c}", "{c}", "new {c} for sale", "IMG_{n:04d}", "", "the {c}", "A+{c}+photo"]
DESCRIPTIONS = [
    "my new {c}", "a {c} I bought yesterday", "black and white picture of a {c}", "",
    "<b>{c}</b> from the shop <a href=\"http://shop.example.com/item\">here</a>",
    "look at this {c} http://example.com/x www.example.org/y", "small grayscale {c}, <i>28 pixels</i>",
    "found this {c} in the closet",
]


@dataclass
class DemoCorpus:
    root: str
    metadata: str  # YFCC100M-format, 25 columns
    subset: str  # yfcc100m_subset_data.tsv format
    image_dir: str
    base_url: str
    port: int
    n_rows: int
    n_in_subset: int
    n_fashion: int
    n_photos: int
    labels: str  # json {line_number: fashion class} for the Fashion-MNIST rows

    def serve(self):
        """Context manager: the HTTP server the metadata's download URLs point at."""
        return serve_directory(self.image_dir, port=self.port)


def _captions(rng, c: str, n: int) -> tuple[str, str]:  # rng: numpy.random.Generator
    while True:
        t = TITLES[rng.integers(len(TITLES))].format(c=c, n=n)
        d = DESCRIPTIONS[rng.integers(len(DESCRIPTIONS))].format(c=c)
        if c in t.replace("+", " ") or c in d:  # the class word must be somewhere
            return t, d


def _params(n_fashion: int, seed: int, port: int, subset_fraction: float, n_dead_links: int) -> dict:
    return {"n_fashion": n_fashion, "seed": seed, "port": port, "subset_fraction": subset_fraction,
            "n_dead_links": n_dead_links, "version": FORMAT_VERSION}


def existing_demo_corpus(out_dir: str, n_fashion: int = 3000, seed: int = 0, port: int = DEFAULT_PORT,
                         subset_fraction: float = 0.95, n_dead_links: int = 3) -> DemoCorpus | None:
    """The corpus under `out_dir` if it was built with these arguments, else None (writes nothing)."""
    params = _params(n_fashion, seed, port, subset_fraction, n_dead_links)
    info_path = os.path.join(os.path.abspath(out_dir), "corpus.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("params") == params:
            return DemoCorpus(**info["corpus"])
    return None


def build_demo_corpus(out_dir: str, n_fashion: int = 3000, seed: int = 0, port: int = DEFAULT_PORT,
                      subset_fraction: float = 0.95, n_dead_links: int = 3) -> DemoCorpus:
    """Write (or reuse, if already built with the same arguments) the demo corpus under `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    found = existing_demo_corpus(out_dir, n_fashion, seed, port, subset_fraction, n_dead_links)
    if found:  # (reusing one imports nothing heavy: a no-op `slip reproduce` only reads corpus.json)
        return found
    import numpy as np
    from PIL import Image

    from datasets import offline
    from datasets.sources.yfcc import format_row

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(os.path.join(image_dir, "fmnist"), exist_ok=True)
    os.makedirs(os.path.join(image_dir, "photos"), exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(seed)

    rows: list[tuple[str, str, str, dict]] = []  # (title, description, relative image path, extra)
    for p in offline.photo_corpus():
        rel = f"photos/{p.name}{os.path.splitext(p.path)[1]}"
        shutil.copyfile(p.path, os.path.join(image_dir, rel))
        rows.append((p.title, p.description, rel, {}))
    images, labels = offline.fashion_mnist("train")  # TRAIN only: the test split is the held-out eval set
    per_class = max(1, n_fashion // len(offline.FASHION_CLASSES))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_class]
                             for k in range(len(offline.FASHION_CLASSES))])
    chosen = rng.permutation(chosen)[:n_fashion]
    for j, idx in enumerate(chosen):
        c = offline.FASHION_CLASSES[labels[idx]]
        rel = f"fmnist/{int(idx):05d}.png"
        Image.fromarray(images[idx]).save(os.path.join(image_dir, rel), optimize=False)
        title, desc = _captions(rng, c, j)
        rows.append((title, desc, rel, {"class": c, "fmnist_index": int(idx)}))
    for k in range(n_dead_links):
        rows.append((f"lost photo {k}", "this file was deleted", f"missing/{k}.jpg", {}))
    order = rng.permutation(len(rows))

    meta = os.path.join(out_dir, "yfcc100m_dataset")
    subset = os.path.join(out_dir, "yfcc100m_subset_data.tsv")
    label_map = {}
    n_sub = 0
    with open(meta, "w", encoding="utf-8") as fm, open(subset, "w") as fs:
        for line, i in enumerate(order):
            title, desc, rel, extra = rows[i]
            pid = 5_000_000_000 + 7 * line
            h = hashlib.md5(str(pid).encode()).hexdigest()
            fm.write(format_row(line, pid, h, title, desc, f"{base}/{rel}") + "\n")
            if line == len(order) // 2:
                fm.write("this line is malformed\tit has three\tfields\n")  # counted, never a crash
            if "class" in extra:
                label_map[line] = extra["class"]
            if rng.random() < subset_fraction:
                fs.write(f"{line}\t{pid}\t{h}\n")
                n_sub += 1
    labels_path = os.path.join(out_dir, "labels.json")
    with open(labels_path, "w") as f:
        json.dump(label_map, f)
    corpus = DemoCorpus(out_dir, meta, subset, image_dir, base, port, len(order), n_sub, len(chosen),
                        len(offline.photo_corpus()), labels_path)
    with open(os.path.join(out_dir, "corpus.json"), "w") as f:
        json.dump({"params": _params(n_fashion, seed, port, subset_fraction, n_dead_links), "corpus": asdict(corpus)},
                  f, indent=1)
    return corpus


@contextlib.contextmanager
def served_demo(out_dir: str, **kw):
    """Build (or reuse) the corpus and serve it: `with served_demo(d) as corpus: ...`."""
    corpus = build_demo_corpus(out_dir, **kw)
    with corpus.serve():
        yield corpus
