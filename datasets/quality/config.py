"""Quality pass settings: `QualityConfig` and its presets (off | default | strict)."""
from __future__ import annotations

from dataclasses import dataclass

from slip_core.config import from_dict, to_dict


@dataclass
class QualityConfig:
    # dedup (datasets/quality/dedup.py); near_dup_hamming < 0 turns the perceptual part off
    exact_dedup: bool = False
    near_dup_hamming: int = -1  # bits of the 256-bit pHash; 20 = measured 0 false pairs on offline corpora
    # decontamination (datasets/quality/decontaminate.py): eval dataset names, ("*",) = every locally available one
    decontaminate: tuple = ()
    decontam_hamming: int = 20
    # caption rules (0 = off)
    min_caption_words: int = 0
    max_caption_words: int = 0
    min_caption_chars: int = 0
    max_caption_chars: int = 0
    drop_boilerplate_captions: bool = False
    # image rules on the original size (0 = off)
    min_image_side: int = 0
    max_aspect_ratio: float = 0.0
    # DataComp-style CLIP score: a checkpoint of ours; samples below min_clip_score are dropped
    clip_score_checkpoint: str = ""
    min_clip_score: float = 0.0
    # manifest URL of the previous version of this dataset: its dedup decisions stay (incremental rebuilds)
    previous_dataset: str = ""

    @property
    def enabled(self) -> bool:
        return self != QualityConfig()


QUALITY_PRESETS: dict[str, QualityConfig] = {
    "off": QualityConfig(),
    # dedup + decontamination against every local eval set + obviously useless captions
    "default": QualityConfig(exact_dedup=True, near_dup_hamming=20, decontaminate=("*",), drop_boilerplate_captions=True),
    # + DataComp-like text/image rules; set clip_score_checkpoint / min_clip_score to add the score filter
    "strict": QualityConfig(exact_dedup=True, near_dup_hamming=20, decontaminate=("*",), drop_boilerplate_captions=True,
                            min_caption_words=2, max_caption_chars=1000, min_image_side=64, max_aspect_ratio=3.0),
}


def make_quality_config(config: dict | None = None, preset: str = "off") -> QualityConfig:
    base = to_dict(QUALITY_PRESETS[preset])
    base.update(config or {})
    return from_dict(QualityConfig, base)
