"""Zero-shot image<->text retrieval: recall@1/5/10 in both directions on a captioned held-out set.

An image may have several captions (COCO/Flickr style). image->text: an image is a hit at k when ANY of its
captions is among the k texts most similar to it; text->image: a caption is a hit when ITS image is among
the k most similar images. Similarity = cosine of the normalised embeddings. Ties are broken by index
(stable sort), so results are deterministic.

Captioned sets: `photos` (the 20 real photos shipped in our dependencies' wheels, title + description each,
`datasets.offline.photo_corpus`) or a folder `<root>/<name>/captions.jsonl` with lines
`{"image": "<path relative to the folder>", "captions": ["...", ...]}` (e.g. an exported Flickr30k/COCO test split).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import common, zeroshot
from slip_core.eval_images import open_image
from slip_core.features import extract


def recall_at_k(image_embed: np.ndarray, text_embed: np.ndarray, text_image: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (x100). text_image[j] = index of the image caption j belongs to."""
    img = image_embed / np.linalg.norm(image_embed, axis=1, keepdims=True).clip(min=1e-12)
    txt = text_embed / np.linalg.norm(text_embed, axis=1, keepdims=True).clip(min=1e-12)
    sim = img @ txt.T  # [images, texts]
    text_image = np.asarray(text_image)
    i2t_rank = np.argsort(-sim, axis=1, kind="stable")  # texts ordered per image
    t2i_rank = np.argsort(-sim.T, axis=1, kind="stable")  # images ordered per text
    # first position at which a correct item appears
    i2t_first = np.array([np.flatnonzero(text_image[i2t_rank[i]] == i).min() for i in range(len(img))])
    t2i_first = np.array([np.flatnonzero(t2i_rank[j] == text_image[j]).min() for j in range(len(txt))])
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * float(np.mean(i2t_first < k))
        out[f"text_to_image_R@{k}"] = 100.0 * float(np.mean(t2i_first < k))
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def load_captioned(name: str, root: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(image paths, captions per image) of a captioned set."""
    if name == "photos":
        from datasets.offline import photo_corpus

        photos = photo_corpus()
        return [p.path for p in photos], [[p.title, p.description] for p in photos]
    from datasets.catalog import DatasetMissing, data_root

    base = data_root(root) / name
    path = base / "captions.jsonl"
    if not path.exists():
        raise DatasetMissing(f"captioned set {name!r} not found: expected {path} with lines "
                             '{"image": "<relative path>", "captions": [...]} (or use the offline set "photos")')
    images, captions = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            images.append(str(base / row["image"]) if not Path(row["image"]).is_absolute() else row["image"])
            captions.append(list(row["captions"]))
    return images, captions


class ImageFiles(torch.utils.data.Dataset):
    """(transform(image), index) per image file, read with the pixel-capped opener."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), i


def embed(lm: common.LoadedModel, images: list[str], captions: list[list[str]], batch_size: int = 128,
          num_workers: int = 0, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(unit image embeddings, unit caption embeddings, image index of each caption); image embeddings are
    extracted across ranks under torchrun, and only rank 0 gets a result (the others None)."""
    zeroshot.require_text_tower(lm.model, "retrieval")
    model = lm.on(device)
    tf = common.zeroshot_transform(model.config.image_size)
    img, _ = extract(model.encode_image, ImageFiles(images, tf), batch_size, num_workers, device)
    if img is None:
        return None
    texts = [c for caps in captions for c in caps]
    text_image = np.array([i for i, caps in enumerate(captions) for _ in caps])
    txt = zeroshot.encode_texts(model, texts, batch_size).numpy()
    return F.normalize(torch.from_numpy(img), dim=-1).numpy(), txt, text_image


def evaluate(lm: common.LoadedModel, name: str = "photos", root: str | None = None, batch_size: int = 128,
             num_workers: int = 0, device: torch.device | str = "cpu") -> dict | None:
    images, captions = load_captioned(name, root)
    embedded = embed(lm, images, captions, batch_size, num_workers, device)
    if embedded is None:
        return None
    img, txt, owner = embedded
    res = recall_at_k(img, txt, owner)
    n = len(images)
    # chance mean recall for reference: a random ranking hits within k with prob ~ k/n (per direction)
    chance = float(np.mean([100.0 * min(1.0, k / n) for k in (1, 5, 10)]))
    return {"metric": "mean_recall", "value": res["mean_recall"], **res, "num_samples": n,
            "num_captions": int(len(owner)), "chance": chance}
