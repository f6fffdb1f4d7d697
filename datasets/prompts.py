"""Class names and zero-shot prompt templates for the eval catalog.

Where they come from (never fetched at run time, never copied from another project):
* ImageNet: `open_clip.zero_shot_metadata` (IMAGENET_CLASSNAMES; SIMPLE_IMAGENET_TEMPLATES are the
  7 templates SLIP uses, SPEC §7 / REFERENCE_NOTES §7.2).
* Most other SLIP datasets: the JSON data files shipped in the `clip-benchmark==1.6.2` wheel
  (`clip_benchmark/datasets/en_classnames.json`, `en_zeroshot_classification_templates.json`), read as plain
  JSON without importing the package (it imports torch/open_clip/pycocoevalcap at import time).
* cifar10/cifar100/stl10: torchvision's `.classes` of the dataset object (as clip_benchmark does).
* Sets whose class names are their folder names (food101, cub200, sun397, cars, aircraft, dtd, resisc45,
  ucf101/kinetics frames): the dataset's own folder names, cleaned (`_` -> space, `001.` prefixes dropped).
* The rest (local offline sets, hateful_memes, rendered_sst2, cub200/ucf101/kinetics templates): written here.

Templates use `{}` for the class name (clip_benchmark's `{c}` is rewritten on load).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re

from datasets.offline import DIGIT_CLASSES, FASHION_CLASSES


class PromptsMissing(LookupError):
    pass


# SLIP catalog name -> clip_benchmark key (class names / templates)
CLIP_BENCHMARK_KEYS = {
    "food101": "food101", "cifar10": "cifar10", "cifar100": "cifar100", "sun397": "sun397", "cars": "cars",
    "aircraft": "fgvc_aircraft", "dtd": "dtd", "pets": "pets", "caltech101": "caltech101", "flowers": "flowers",
    "mnist": "mnist", "fer2013": "fer2013", "stl10": "stl10", "eurosat": "eurosat", "resisc45": "resisc45",
    "gtsrb": "gtsrb", "kitti_distance": "kitti_closest_vehicle_distance", "country211": "country211",
    "patch_camelyon": "pcam", "clevr_counts": "clevr_count_all", "rendered_sst2": "renderedsst2",
}

# Written by us.
OUR_CLASSNAMES: dict[str, list[str]] = {
    "fashion_mnist": list(FASHION_CLASSES),
    "digits": list(DIGIT_CLASSES),
    "mnist": list(DIGIT_CLASSES),  # the local sets never need clip-benchmark
    "hateful_memes": ["meme", "hatespeech meme"],  # SPEC §7 / REFERENCE_NOTES §7.2 (score = logit1 - logit0)
    "rendered_sst2": ["negative", "positive"],
}
OUR_TEMPLATES: dict[str, list[str]] = {
    "fashion_mnist": ["a photo of a {}."],  # SLIP has no Fashion-MNIST template (OFFLINE_DATA §2)
    "digits": ['a photo of the number: "{}".'],
    "mnist": ['a photo of the number: "{}".'],  # SLIP's single MNIST template (OFFLINE_DATA §2)
    "cub200": ["a photo of a {}, a type of bird."],
    "ucf101_frames": ["a photo of a person {}.", "a video of a person {}.", "a person doing {}.",
                      "a photo of a person doing {}.", "an example of a person doing {}."],
    "kinetics700_frames": ["a photo of {}.", "a video of {}.", "a photo of a person {}.",
                           "a video frame of a person doing {}.", "an example of {}."],
    "hateful_memes": ["a {}."],
}
FOLDER_CLASSNAMES = {"food101", "cub200", "sun397", "cars", "aircraft", "dtd", "resisc45", "ucf101_frames",
                     "kinetics700_frames"}


@functools.lru_cache(maxsize=None)
def _clip_benchmark_json(fname: str) -> dict:
    spec = importlib.util.find_spec("clip_benchmark")  # find_spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise PromptsMissing("clip-benchmark is not installed: pip install --no-deps clip-benchmark==1.6.2")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", fname)
    with open(path) as f:
        return json.load(f)


def _imagenet():
    from open_clip import zero_shot_metadata as meta

    names = list(meta.IMAGENET_CLASSNAMES)
    templates = [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    return names, templates


def clean_folder_name(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'; 'apple_pie' -> 'apple pie'."""
    name = re.sub(r"^\d+[._-]", "", name)
    return name.replace("_", " ").strip()


def templates_for(name: str) -> list[str]:
    if name in OUR_TEMPLATES:
        return list(OUR_TEMPLATES[name])
    if name == "imagenet":
        return _imagenet()[1]
    key = CLIP_BENCHMARK_KEYS.get(name)
    table = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    if key is None or key not in table:
        raise PromptsMissing(f"no zero-shot templates known for {name!r}")
    return [t.replace("{c}", "{}") for t in table[key]]


def classnames_for(name: str, folder_classes: list[str] | None = None,
                   dataset_classes: list[str] | None = None) -> list[str | list[str]]:
    """Class names in label order. A class may be a list of synonyms (every template x synonym is embedded).

    folder_classes: the dataset's own class folder names (ImageFolder order) when loaded from folders;
    dataset_classes: a torchvision dataset's `.classes` or a webdataset's classnames.txt.
    """
    if name in OUR_CLASSNAMES:
        return list(OUR_CLASSNAMES[name])
    if name == "imagenet":
        return _imagenet()[0]
    if name == "clevr_counts" and folder_classes:
        # SLIP's filelist labels are "count_N", indexed in sorted string order ("10", "3", ..., "9").
        return [c.replace("count_", "") for c in folder_classes]
    if name in FOLDER_CLASSNAMES and folder_classes:
        return [clean_folder_name(c) for c in folder_classes]
    key = CLIP_BENCHMARK_KEYS.get(name)
    names = _clip_benchmark_json("en_classnames.json")
    if key in names:
        return list(names[key])
    if dataset_classes:
        return [clean_folder_name(c) for c in dataset_classes]
    if folder_classes:
        return [clean_folder_name(c) for c in folder_classes]
    raise PromptsMissing(f"no class names known for {name!r} (and the dataset provides none)")


def fill(templates: list[str], classname: str | list[str]) -> list[str]:
    """All prompts for one class: every template x every synonym (REFERENCE_NOTES §7.1)."""
    names = [classname] if isinstance(classname, str) else list(classname)
    return [t.format(n) for n in names for t in templates]
