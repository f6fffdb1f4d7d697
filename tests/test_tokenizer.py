"""Tokenizer = the CLIP/SLIP reference (SPEC §2, §9.2).

The independent expectation is open_clip's own tokenizer (same vocab file, OpenAI's code), which differs
from the reference only in (a) forcing EOT on truncation and (b) spelling the special tokens differently;
both differences are checked separately with hand-derived ids.
"""
from __future__ import annotations

import gzip
import hashlib
import random

import open_clip
import pytest
import torch
from open_clip.tokenizer import default_bpe

from slip_core.tokenizer import EOT_ID, SOT_ID, decode, encode, tokenize


def _hostile_strings(n_random: int = 300, seed: int = 0) -> list[str]:
    fixed = [
        "", " ", "\n\t  \r\n", "a photo of a cat.", "A  PHOTO\tOF\nA   CAT", "it's they're we've I'm you'll he'd",
        "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39; &nbsp;", "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m",
        "\u00e2\u20ac\u201cmojibake\u00e2\u20ac\u009d",  # ftfy repairs this
        "🐱🐶🚀👩‍👩‍👧‍👦🏳️‍🌈 emoji", "日本語のテキスト 中文字符 한국어", "مرحبا بالعالم שלום עולם", "\u202eRTL override\u202c",
        "Ǆǅǆ ﬁﬂ ß ẞ İı", "x" * 300, "supercalifragilistic" * 15, "1234567890" * 10, "a1b2c3 4.5e-10 -0",
        "!!!???...,,,;;;:::", "@#$%^&*()_+=[]{}|\\/<>~`", "\x00\x01\x02 control", "\u200b\u200c\u200d zero width",
        "the " * 100, "word " * 74, "word " * 75, "word " * 76, "Ｆｕｌｌｗｉｄｔｈ", "\U0001d400\U0001d401 math",
        "\ud800 lone surrogate", "a\udc00b", "\ud83d\ude00 surrogate pair", "e\u0301 combining", "\ud7ff\ue000\uffff", "𠀀𠀁 astral CJK", "tab\tsep\tvalues", "'s 't 're", "''''",
    ]
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ     ",
        "0123456789.,;:!?'\"()[]{}<>&#-_/\\",
        "éèêëàâäôöûüçñøåæœßÉÈÀÇ", "日本語中文字符한국어テキストひらがな", "مرحبابالعالمשלוםעולם",
        "😀😂🥲🐱🐶🚀🌈🏳️‍👍🏽", "\u0301\u0308\u200b\u200d\u2028\u00a0\u3000", "&amp;&lt;&gt;&quot;&#39;&#x27;",
    ]
    out = list(fixed)
    for _ in range(n_random):
        k = rng.randint(0, 60) if rng.random() < 0.6 else rng.randint(60, 400)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


HOSTILE = _hostile_strings()


def test_vocab_file_is_the_reference_one():
    data = gzip.open(default_bpe()).read()
    digest = hashlib.sha256(open(default_bpe(), "rb").read()).hexdigest()
    assert digest.startswith("924691ac") and digest.endswith("d6804a")  # SPEC §2
    lines = data.decode("utf-8").split("\n")
    assert "#version" in lines[0] and len(lines) > 1 + 48894


def test_known_ids():
    ids = tokenize("a photo of a cat.")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert ids[0, 8:].eq(0).all()
    # SLIP_REFERENCE_NOTES §2 sanity check: cleaning (html unescape, whitespace, lowercase) + BPE.
    assert encode("A photo of a CAT.  &amp; dog") == [320, 1125, 539, 320, 2368, 269, 261, 1929]
    assert decode(tokenize("A photo of a CAT.  &amp; dog")[0]) == "a photo of a cat . & dog"
    assert tokenize("")[0, :3].tolist() == [SOT_ID, EOT_ID, 0]


def test_matches_open_clip_on_hostile_strings():
    ours = tokenize(HOSTILE)
    theirs = open_clip.tokenize(HOSTILE)  # forces EOT into slot 76 when truncating
    assert ours.shape == theirs.shape == (len(HOSTILE), 77)
    n_fit = n_cut = 0
    for i, text in enumerate(HOSTILE):
        full = [SOT_ID] + open_clip.tokenizer._tokenizer.encode(text) + [EOT_ID]
        if len(full) <= 77:
            n_fit += 1
            assert torch.equal(ours[i], theirs[i]), text
        else:
            n_cut += 1
            # reference truncation: first 77 ids, the last one is an ordinary BPE id, never EOT
            assert ours[i].tolist() == full[:77], text
            assert ours[i, 76].item() != EOT_ID and EOT_ID not in ours[i].tolist()
            assert torch.equal(ours[i, :76], theirs[i, :76]) and theirs[i, 76].item() == EOT_ID
    assert n_fit > 100 and n_cut > 50, (n_fit, n_cut)
    # force_eot reproduces open_clip exactly for every row
    assert torch.equal(tokenize(HOSTILE, force_eot=True), theirs)


def test_truncation_boundary():
    fits = tokenize("word " * 75)  # 1 + 75 + 1 = 77 ids: fits exactly, EOT at slot 76
    assert fits[0, 76].item() == EOT_ID
    cut = tokenize("word " * 76)
    assert EOT_ID not in cut[0].tolist() and cut[0, 76].item() == cut[0, 75].item()
    assert tokenize("word " * 76, force_eot=True)[0, 76].item() == EOT_ID
    # the text tower pools at argmax id: for a cut caption that is NOT the last slot in general
    short = tokenize(["hello world"] * 2, context_length=5)
    assert short.shape == (2, 5) and short[0].tolist()[:4] == [SOT_ID] + encode("hello world") + [EOT_ID]


def test_reference_special_token_spelling():
    # The reference regex matches "<|endoftext|>" literally (id 49407); open_clip's spelling is plain text.
    ids = tokenize("hi <|endoftext|> there")[0].tolist()
    assert ids[:5] == [SOT_ID, encode("hi")[0], EOT_ID, encode("there")[0], EOT_ID]
    plain = tokenize("<start_of_text>")[0].tolist()
    assert SOT_ID not in plain[1:] and plain[1:plain.index(EOT_ID)] == encode("< start _ of _ text >".replace(" ", ""))


def test_bad_input():
    with pytest.raises(TypeError):
        tokenize(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        tokenize("x", context_length=1)
