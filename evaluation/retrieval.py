"""Zero-shot image<->text retrieval: recall@1/5/10 in both directions on a captioned test split (the retrieval
catalog, datasets/retrieval_sets.py: COCO / Flickr30k Karpathy test splits, CLIP_benchmark's retrieval
webdataset, a captions.jsonl folder, the offline photos).

Definition = CLIP_benchmark's (and the CLIP papers'): an image may have several captions. image->text
(CLIP_benchmark's "text_retrieval_recall@k"): an image is a hit at k when ANY of its captions is among the k
texts most similar to it; text->image ("image_retrieval_recall@k"): a caption is a hit when ITS image is among
the k most similar images. Similarity = cosine of the normalised embeddings. Ties are broken by index (stable
sort), so results are deterministic.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from datasets import retrieval_sets
from evaluation import common, zeroshot
from slip_core.eval_images import CaptionedShards, open_image
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


class ImageFiles(torch.utils.data.Dataset):
    """(transform(image), index) per image file, read with the pixel-capped opener."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), i


def image_dataset(split: retrieval_sets.CaptionedSplit, transform) -> torch.utils.data.Dataset:
    """(image, index in the split) for every image of a captioned split, whatever its on-disk form."""
    if split.images is not None:
        return ImageFiles(split.images, transform)
    offsets = np.concatenate([[0], np.cumsum(split.shard_counts)[:-1]]).astype(int).tolist()
    return CaptionedShards(split.shards, offsets, transform, retrieval_sets.IMAGE_EXTS)


def embed(lm: common.LoadedModel, split: retrieval_sets.CaptionedSplit, batch_size: int = 128,
          num_workers: int = 0, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(unit image embeddings in split order, unit caption embeddings, image index of each caption); image
    embeddings are extracted across ranks under torchrun, and only rank 0 gets a result (the others None)."""
    zeroshot.require_text_tower(lm.model, "retrieval")
    model = lm.on(device)
    img, index = extract(model.encode_image, image_dataset(split, common.zeroshot_transform(model.config.image_size)),
                         batch_size, num_workers, device)
    if img is None:
        return None
    if not np.array_equal(np.sort(index), np.arange(len(split))):
        raise ValueError(f"{split.name}: read {len(index)} images for {len(split)} caption groups")
    img = img[np.argsort(index)]  # worker / rank order -> split order
    texts = [c for caps in split.captions for c in caps]
    text_image = np.array([i for i, caps in enumerate(split.captions) for _ in caps])
    txt = zeroshot.encode_texts(model, texts, batch_size).numpy()
    return F.normalize(torch.from_numpy(img), dim=-1).numpy(), txt, text_image


def evaluate(lm: common.LoadedModel, name: str = "photos", root: str | None = None, batch_size: int = 128,
             num_workers: int = 0, device: torch.device | str = "cpu") -> dict | None:
    split = retrieval_sets.load(name, root)
    embedded = embed(lm, split, batch_size, num_workers, device)
    if embedded is None:
        return None
    img, txt, owner = embedded
    res = recall_at_k(img, txt, owner)
    n = len(split)
    # chance mean recall for reference: a random ranking hits within k with prob ~ k/n (per direction)
    chance = float(np.mean([100.0 * min(1.0, k / n) for k in (1, 5, 10)]))
    return {"metric": "mean_recall", "value": res["mean_recall"], **res, "num_samples": n,
            "num_captions": int(len(owner)), "chance": chance, "data_format": split.format}
