"""CLIP byte-level BPE tokenizer with SLIP's reference semantics (SPEC §2, §9.2).

The vocabulary, byte map, text cleaning and BPE merge loop all come from `open_clip.tokenizer.SimpleTokenizer`
(the `bpe_simple_vocab_16e6.txt.gz` shipped in the open_clip wheel); nothing here re-implements BPE.
Two things differ from open_clip and are restored to the reference (OpenAI CLIP / SLIP `tokenizer.py`):

1. Special tokens are spelled `<|startoftext|>` / `<|endoftext|>` (open_clip renamed them
   `<start_of_text>` / `<end_of_text>`). The spelling matters: the pre-tokenisation regex matches the
   special strings literally, so a caption containing "<|endoftext|>" encodes to id 49407 in the reference.
2. Truncation: the reference keeps the first `context_length` ids, so a cut caption has NO end token and the
   text tower pools at the largest id in the row. open_clip (and OpenAI `clip.tokenize(truncate=True)`)
   overwrite the last slot with the end token; that behaviour is available as `force_eot=True`.
"""
from __future__ import annotations

from functools import lru_cache

import regex as re
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
# BPE is quadratic in a word's length (a 32k-letter word takes ~13 s; a 1 MB caption would take hours) and only
# the first `context_length` ids are kept. An id covers at most 32 bytes of cleaned text (the longest vocabulary
# entry) and cleaning collapses whitespace runs to one space, so those ids come from the first 33 x context_length
# characters of any real caption; `tokenize` cuts there, bounding a hostile caption (~0.35 s here, worst case).
MAX_CHARS_PER_ID = 33

# The reference pattern (OpenAI CLIP simple_tokenizer.py): specials, contractions, letter runs,
# single digits, runs of other non-space characters.
_REFERENCE_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class ReferenceTokenizer(SimpleTokenizer):
    """open_clip's SimpleTokenizer with the reference special-token spelling (vocab and BPE unchanged)."""

    def __init__(self, bpe_path: str | None = None):
        super().__init__(bpe_path=bpe_path or default_bpe(), context_length=CONTEXT_LENGTH, clean="lower")
        renames = {self.decoder[self.sot_token_id]: SOT_TOKEN, self.decoder[self.eot_token_id]: EOT_TOKEN}
        self.encoder = {renames.get(tok, tok): idx for tok, idx in self.encoder.items()}
        self.decoder = {idx: tok for tok, idx in self.encoder.items()}
        # The BPE cache is seeded with the specials so that bpe() returns them whole.
        self.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.pat = re.compile(_REFERENCE_PATTERN, re.IGNORECASE)
        if (self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN], len(self.encoder)) != (SOT_ID, EOT_ID, VOCAB_SIZE):
            raise RuntimeError("unexpected BPE vocabulary: special ids / vocab size differ from CLIP's")


@lru_cache(maxsize=1)
def get_tokenizer() -> ReferenceTokenizer:
    return ReferenceTokenizer()


def encode(text: str) -> list[int]:
    """BPE ids of one caption, without start/end tokens."""
    return get_tokenizer().encode(text)


def decode(ids) -> str:
    """Text of a list/tensor of ids; zero padding after the end token and the specials are dropped."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if EOT_ID in ids:
        ids = ids[: ids.index(EOT_ID)]
    ids = [i for i in ids if i != SOT_ID]
    return get_tokenizer().decode(ids).strip()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH, force_eot: bool = False) -> torch.LongTensor:
    """Tokenize captions into a zero-padded LongTensor [N, context_length].

    Each row is [SOT] + BPE ids + [EOT]. A row longer than `context_length` is cut to its first
    `context_length` ids (reference: no end token survives); with `force_eot=True` the last slot is
    overwritten with EOT instead (open_clip / OpenAI behaviour, SPEC §9.2).
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects str captions, got {type(text).__name__} at index {i}")
        if len(text) > MAX_CHARS_PER_ID * context_length:  # cleaning collapses whitespace anyway
            text = " ".join(text.split())[: MAX_CHARS_PER_ID * context_length]
        ids = [SOT_ID] + tok.encode(text) + [EOT_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            if force_eot:
                ids[-1] = EOT_ID
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
