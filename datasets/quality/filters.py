"""Per-sample caption / image filters and a CLIP-score filter; each returns the reason a sample fails.

Reasons are short, stable strings ('' = passes) recorded in the ledger as status `filtered`:
    empty_caption, boilerplate_caption, caption_words<N, caption_words>N, caption_chars<N, caption_chars>N,
    image_min_side<N, aspect_ratio>R, undecodable_image, clip_score<T.

The CLIP score is DataComp's (Gadre et al., 2023): cosine similarity of the image and caption embeddings
of a CLIP model — here any checkpoint of ours (slip_core.checkpoint.load_checkpoint), so nothing is
downloaded. Images go through the reference val transform (slip_core.augment.val_transform) at the
model's image size; captions through the reference tokenizer.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

# Camera / phone default file names used as titles, e.g. IMG_1234, DSC01234, DSCN0001, P1010123, _MG_1234,
# IMGP1234, DSC_0001, GOPR0042, DJI_0001, PXL_20210101_123456789, IMG_20190101_123456, 100_1234, "IMG_1234 (2)",
# optionally with an image-file extension.
_CAMERA_NAME = re.compile(
    r"""^\s*(?:
        (?:img|_mg|imgp|dsc|dscn|dscf|dsc_|dcp|dcim|p|pict|pic|sam|gopr|gp|dji|mvc|cimg|pxl|vid|mov|mvi|photo|image|hpim|sdc|wp|screenshot)
        [-_ ]?\d{2,}(?:[-_ ]\d+)*
      | \d{3}[-_]\d{3,}
      | \d{6,}(?:[-_ ]\d+)*
    )(?:\s*\(\d+\))?(?:\.(?:jpe?g|png|gif|tiff?|bmp|heic|raw|cr2|nef|arw|dng))?\s*$""",
    re.IGNORECASE | re.VERBOSE)
_FILE_NAME = re.compile(r"^\s*\S+\.(?:jpe?g|png|gif|tiff?|bmp|heic|raw|cr2|nef|arw|dng)\s*$", re.IGNORECASE)
_PLACEHOLDERS = {"untitled", "no title", "notitle", "image", "photo", "picture", "img", "null", "none", "n/a", "na",
                 "unknown", "default", "title", "description", "caption", "untitled image", "untitled photo"}


def is_boilerplate(caption: str) -> bool:
    """True for captions that carry no description: camera file names, bare file names, placeholders,
    and strings without a single letter (numbers, punctuation, dates)."""
    c = caption.strip()
    if _CAMERA_NAME.match(c) or _FILE_NAME.match(c):
        return True
    if c.lower().strip(" .!-_") in _PLACEHOLDERS:
        return True
    return not any(ch.isalpha() for ch in c)


def caption_reason(caption: str | None, min_words: int = 0, max_words: int = 0, min_chars: int = 0,
                   max_chars: int = 0, drop_boilerplate: bool = False) -> str:
    """Why a caption fails the configured rules ('' = passes). 0 disables a bound."""
    c = (caption or "").strip()
    if (min_words or min_chars or drop_boilerplate) and not c:
        return "empty_caption"
    if drop_boilerplate and is_boilerplate(c):
        return "boilerplate_caption"
    n_words = len(c.split())
    if min_words and n_words < min_words:
        return f"caption_words<{min_words}"
    if max_words and n_words > max_words:
        return f"caption_words>{max_words}"
    if min_chars and len(c) < min_chars:
        return f"caption_chars<{min_chars}"
    if max_chars and len(c) > max_chars:
        return f"caption_chars>{max_chars}"
    return ""


# ------------------------------------------------------------------------- the caption rules, columnar

def _re2(pattern: re.Pattern) -> str:
    """The same regex for Arrow's RE2, case-insensitive, with VERBOSE whitespace removed (kept inside [...])."""
    out, in_class, esc = [], False, False
    for ch in pattern.pattern:
        if esc:
            out.append(ch)
            esc = False
        elif ch == "\\":
            out.append(ch)
            esc = True
        elif in_class:
            out.append(ch)
            in_class = ch != "]"
        elif ch == "[":
            out.append(ch)
            in_class = True
        elif not (pattern.flags & re.VERBOSE and ch.isspace()):
            out.append(ch)
    return "(?i)" + "".join(out)


_BOILERPLATE_RE2 = (_re2(_CAMERA_NAME), _re2(_FILE_NAME))
_PLAIN = r"^[\x20-\x7e]*$"  # printable ASCII: where Python's and Arrow's whitespace, case, digits and letters agree


def caption_reasons(captions, min_words: int = 0, max_words: int = 0, min_chars: int = 0, max_chars: int = 0,
                    drop_boilerplate: bool = False) -> np.ndarray:
    """caption_reason of every caption of a string array, as an object array of reasons ('' = passes).
    Printable-ASCII captions are judged by Arrow kernels (RE2 for the boilerplate patterns); the others
    (non-ASCII, control characters) by caption_reason itself, so the result is that function's exactly."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = captions.combine_chunks() if isinstance(captions, pa.ChunkedArray) else captions
    arr = pc.fill_null(arr.cast(pa.string()), "")
    n = len(arr)
    out = np.full(n, "", object)
    if not (min_words or max_words or min_chars or max_chars or drop_boilerplate) or not n:
        return out
    plain = pc.match_substring_regex(arr, _PLAIN).to_numpy(zero_copy_only=False)
    rules = (min_words, max_words, min_chars, max_chars, drop_boilerplate)
    other = np.flatnonzero(~plain)
    out[other] = [caption_reason(c, *rules) for c in arr.take(pa.array(other)).to_pylist()]
    idx = np.flatnonzero(plain)
    c = pc.utf8_trim(arr.take(pa.array(idx)), " ")
    why = np.full(len(idx), "", object)
    open_ = np.ones(len(idx), bool)  # no reason yet: the checks run in caption_reason's order

    def rule(mask, reason):
        hit = open_ & mask
        why[hit] = reason
        open_[hit] = False

    chars = pc.utf8_length(c).to_numpy(zero_copy_only=False)
    if min_words or min_chars or drop_boilerplate:
        rule(chars == 0, "empty_caption")
    if drop_boilerplate:
        boiler = pc.or_(pc.or_(*(pc.match_substring_regex(c, p) for p in _BOILERPLATE_RE2)),
                        pc.is_in(pc.utf8_trim(pc.ascii_lower(c), " .!-_"), value_set=pa.array(sorted(_PLACEHOLDERS))))
        boiler = pc.or_(boiler, pc.invert(pc.match_substring_regex(c, "[A-Za-z]")))
        rule(boiler.to_numpy(zero_copy_only=False), "boilerplate_caption")
    words = pc.count_substring_regex(c, "[^ ]+").to_numpy(zero_copy_only=False)
    if min_words:
        rule(words < min_words, f"caption_words<{min_words}")
    if max_words:
        rule(words > max_words, f"caption_words>{max_words}")
    if min_chars:
        rule(chars < min_chars, f"caption_chars<{min_chars}")
    if max_chars:
        rule(chars > max_chars, f"caption_chars>{max_chars}")
    out[idx] = why
    return out


def image_reason(width: int | None, height: int | None, min_side: int = 0, max_aspect_ratio: float = 0.0) -> str:
    """Why an image's size fails ('' = passes): short side below `min_side`, or long/short side above
    `max_aspect_ratio`. Judged on the ORIGINAL size (img2dataset resizes every image to the same size)."""
    if not width or not height:
        return "undecodable_image" if (min_side or max_aspect_ratio) else ""
    if min_side and min(width, height) < min_side:
        return f"image_min_side<{min_side}"
    if max_aspect_ratio and max(width, height) / min(width, height) > max_aspect_ratio:
        return f"aspect_ratio>{max_aspect_ratio:g}"
    return ""


# ----------------------------------------------------------------------------------------- CLIP score

def load_scoring_model(checkpoint):
    """A CLIP/SLIP model (eval mode) from a checkpoint path/URL, or the module itself."""
    if isinstance(checkpoint, str):
        from slip_core.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint)
    else:
        model = checkpoint
    if not hasattr(model, "encode_text"):
        raise ValueError(f"{type(model).__name__} has no text encoder; the CLIP-score filter needs a CLIP or SLIP checkpoint")
    return model.eval()


def clip_scores(samples: Iterable[tuple[str, bytes, str]], checkpoint, batch_size: int = 64) -> Iterator[tuple[str, float]]:
    """(key, cosine(image, caption)) for (key, image bytes, caption) samples; undecodable images get nan."""
    import torch

    from slip_core.augment import BadImage, decode_image, val_transform
    from slip_core.tokenizer import tokenize

    model = load_scoring_model(checkpoint)
    cfg = model.config
    size, ctx = int(cfg.image_size), int(getattr(cfg, "context_length", 77))

    def flush(batch):
        keys, imgs, caps = zip(*batch)
        with torch.inference_mode():
            ie = model.encode_image(torch.stack(imgs)).float()
            te = model.encode_text(tokenize(list(caps), context_length=ctx)).float()
            sim = torch.nn.functional.cosine_similarity(ie, te, dim=-1)
        return zip(keys, sim.tolist())

    batch = []
    for key, data, caption in samples:
        try:
            arr = decode_image(data, min_side=size)
        except BadImage:
            yield key, float("nan")
            continue
        batch.append((key, val_transform(arr, size), caption or ""))
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def score_reason(score: float | None, min_score: float) -> str:
    if score is None or np.isnan(score):
        return "undecodable_image"
    return f"clip_score<{min_score:g}" if score < min_score else ""
