"""Class names and zero-shot prompt templates for the eval catalog, and where each came from.

Where they come from (never fetched at run time, never copied from another project), in precedence order:
* SLIP's own catalog files, when the user has them (`--reference-prompts DIR` / EvalConfig.reference_prompts):
  `templates.json` and `labels.json` as they ship in SLIP's repository (dataset -> list of templates with `{}`;
  dataset -> list of class names, a class may be a list of synonyms), used verbatim for every dataset they
  cover; `dataset_catalog.json` (dataset -> {path, type imagefolder|special|filelist, train, test}) tells
  datasets.catalog where such a dataset lives. Source `slip-reference`.
* Written here (local offline sets, hateful_memes, rendered_sst2, cub200/ucf101/kinetics templates): `ours`.
* ImageNet: `open_clip.zero_shot_metadata` (IMAGENET_CLASSNAMES; SIMPLE_IMAGENET_TEMPLATES are the 7 templates
  SLIP uses, SPEC §7 / REFERENCE_NOTES §7.2): `open-clip`.
* Sets whose class names are their folder names (food101, cub200, sun397, cars, aircraft, dtd, resisc45,
  ucf101/kinetics frames): the dataset's own folder names, cleaned (`_` -> space, `001.` prefixes dropped):
  `dataset`.
* Most other SLIP datasets: the JSON data files shipped in the `clip-benchmark==1.6.2` wheel
  (`clip_benchmark/datasets/en_classnames.json`, `en_zeroshot_classification_templates.json`), read as plain
  JSON without importing the package (it imports torch/open_clip/pycocoevalcap at import time):
  `clip-benchmark`.
* Last, what the dataset ships: torchvision's `.classes`, a webdataset export's classnames.txt /
  zeroshot_classification_templates.txt: `dataset`.

Templates use `{}` for the class name (clip_benchmark's `{c}` is rewritten on load). Every eval record carries
`prompt_source` (see `Prompts.source`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field

from datasets.offline import DIGIT_CLASSES, FASHION_CLASSES
from slip_core.config import ConfigError

SLIP_REFERENCE, CLIP_BENCHMARK, OPEN_CLIP, DATASET, OURS = "slip-reference", "clip-benchmark", "open-clip", "dataset", "ours"
REFERENCE_FILES = ("templates.json", "labels.json", "dataset_catalog.json")
REFERENCE_TYPES = ("imagefolder", "special", "filelist")  # dataset_catalog.json "type" values


class PromptsMissing(LookupError):
    pass


class ReferencePromptsError(ConfigError):
    """A --reference-prompts folder that is missing a file or does not have SLIP's format."""


@dataclass(frozen=True)
class ReferencePrompts:
    """SLIP's templates.json / labels.json / dataset_catalog.json, as read from one folder."""
    directory: str
    sha256: str  # of the three files' contents (a changed file is a different evaluation)
    templates: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    catalog: dict = field(default_factory=dict)


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferencePromptsError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ReferencePromptsError(f"{path}: expected a JSON object (dataset name -> entry), got {type(data).__name__}")
    return data


def _check_reference(templates: dict, labels: dict, catalog: dict, directory: str) -> None:
    for name, ts in templates.items():
        if not (isinstance(ts, list) and ts and all(isinstance(t, str) and "{}" in t for t in ts)):
            raise ReferencePromptsError(f"{directory}/templates.json: {name!r} must be a non-empty list of "
                                        "templates, each with a {} for the class name")
    for name, ls in labels.items():
        ok = isinstance(ls, list) and ls and all(
            isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(x, str) for x in c)) for c in ls)
        if not ok:
            raise ReferencePromptsError(f"{directory}/labels.json: {name!r} must be a list of class names "
                                        "(a class may be a list of synonyms)")
    for name, entry in catalog.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry.get("type") in REFERENCE_TYPES):
            raise ReferencePromptsError(f"{directory}/dataset_catalog.json: {name!r} needs a 'path' and a 'type' in "
                                        f"{REFERENCE_TYPES}")


@functools.lru_cache(maxsize=8)
def _load_reference(directory: str, stamp: tuple) -> ReferencePrompts:
    paths = {f: os.path.join(directory, f) for f in REFERENCE_FILES}
    h = hashlib.sha256()
    for f in REFERENCE_FILES:
        if os.path.exists(paths[f]):
            with open(paths[f], "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read() + b"\0")
    templates, labels = _read_json_object(paths["templates.json"]), _read_json_object(paths["labels.json"])
    catalog = _read_json_object(paths["dataset_catalog.json"]) if os.path.exists(paths["dataset_catalog.json"]) else {}
    _check_reference(templates, labels, catalog, directory)
    return ReferencePrompts(directory, h.hexdigest(), templates, labels, catalog)


def load_reference(directory: str | None) -> ReferencePrompts | None:
    """SLIP's catalog files from `directory` (None -> None). templates.json and labels.json are required,
    dataset_catalog.json is optional; a missing file or a wrong format raises ReferencePromptsError."""
    if not directory:
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    missing = [f for f in REFERENCE_FILES[:2] if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ReferencePromptsError(f"--reference-prompts {directory}: missing {', '.join(missing)} (expected SLIP's "
                                    "templates.json and labels.json, optionally dataset_catalog.json)")
    stamp = tuple(os.stat(os.path.join(directory, f)).st_mtime_ns if os.path.exists(os.path.join(directory, f)) else 0
                  for f in REFERENCE_FILES)
    return _load_reference(directory, stamp)


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


def _templates(name: str, file_templates: list[str] | None = None,
               reference: ReferencePrompts | None = None) -> tuple[list[str], str]:
    if reference is not None and name in reference.templates:
        return list(reference.templates[name]), SLIP_REFERENCE
    if name in OUR_TEMPLATES:
        return list(OUR_TEMPLATES[name]), OURS
    if name == "imagenet":
        return _imagenet()[1], OPEN_CLIP
    key = CLIP_BENCHMARK_KEYS.get(name)
    try:
        table = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    except PromptsMissing:
        if not file_templates:
            raise
        table = {}
    if key in table:
        return [t.replace("{c}", "{}") for t in table[key]], CLIP_BENCHMARK
    if file_templates:  # a CLIP_benchmark webdataset export's zeroshot_classification_templates.txt
        return [t.replace("{c}", "{}") for t in file_templates], DATASET
    raise PromptsMissing(f"no zero-shot templates known for {name!r}")


def templates_for(name: str) -> list[str]:
    return _templates(name)[0]


def _classnames(name: str, folder_classes: list[str] | None = None, dataset_classes: list[str] | None = None,
                reference: ReferencePrompts | None = None) -> tuple[list, str]:
    if reference is not None and name in reference.labels:
        return list(reference.labels[name]), SLIP_REFERENCE
    if name in OUR_CLASSNAMES:
        return list(OUR_CLASSNAMES[name]), OURS
    if name == "imagenet":
        return _imagenet()[0], OPEN_CLIP
    if name == "clevr_counts" and folder_classes:
        # SLIP's filelist labels are "count_N", indexed in sorted string order ("10", "3", ..., "9").
        return [c.replace("count_", "") for c in folder_classes], DATASET
    if name in FOLDER_CLASSNAMES and folder_classes:
        return [clean_folder_name(c) for c in folder_classes], DATASET
    key = CLIP_BENCHMARK_KEYS.get(name)
    try:
        names = _clip_benchmark_json("en_classnames.json")
    except PromptsMissing:
        if not (dataset_classes or folder_classes):
            raise
        names = {}
    if key in names:
        return list(names[key]), CLIP_BENCHMARK
    if dataset_classes or folder_classes:
        return [clean_folder_name(c) for c in dataset_classes or folder_classes], DATASET
    raise PromptsMissing(f"no class names known for {name!r} (and the dataset provides none)")


def classnames_for(name: str, folder_classes: list[str] | None = None,
                   dataset_classes: list[str] | None = None) -> list[str | list[str]]:
    """Class names in label order. A class may be a list of synonyms (every template x synonym is embedded).

    folder_classes: the dataset's own class folder names (ImageFolder order) when loaded from folders;
    dataset_classes: a torchvision dataset's `.classes` or a webdataset's classnames.txt.
    """
    return _classnames(name, folder_classes, dataset_classes)[0]


@dataclass(frozen=True)
class Prompts:
    """The class names and templates one dataset is scored with, and where each came from."""
    classnames: list
    templates: list[str]
    classnames_source: str
    templates_source: str

    @property
    def source(self) -> str:
        """One source when both agree (slip-reference, clip-benchmark, open-clip, dataset, ours), else
        "<class names' source>+<templates' source>"."""
        if self.classnames_source == self.templates_source:
            return self.classnames_source
        return f"{self.classnames_source}+{self.templates_source}"


def resolve(name: str, folder_classes: list[str] | None = None, dataset_classes: list[str] | None = None,
            file_templates: list[str] | None = None, reference: ReferencePrompts | None = None) -> Prompts:
    """Class names and templates for a catalog dataset. Precedence: SLIP's own files when given
    (`reference`, used verbatim), then ours, open_clip's ImageNet metadata, the dataset's folder names for
    folder-named sets, clip-benchmark's packaged JSON, and last what the dataset itself ships."""
    classnames, c_src = _classnames(name, folder_classes, dataset_classes, reference)
    templates, t_src = _templates(name, file_templates, reference)
    return Prompts(classnames, templates, c_src, t_src)


def fill(templates: list[str], classname: str | list[str]) -> list[str]:
    """All prompts for one class: every template x every synonym (REFERENCE_NOTES §7.1)."""
    names = [classname] if isinstance(classname, str) else list(classname)
    return [t.format(n) for n in names for t in templates]
