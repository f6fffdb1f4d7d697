"""Dataset stage settings: `DatasetConfig`, its presets and `make_config` (slip_core.config.resolve on them).

Which fields change what a download produces (the work folder's identity, datasets/work.py) and which are
parallelism only (`PARALLEL_FIELDS`) is decided here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slip_core.config import resolve

from datasets.quality import hash_engines
from datasets.quality.config import QUALITY_PRESETS, QualityConfig  # issue 10: dedup, decontamination, filters

@dataclass
class DatasetConfig:
    name: str = "yfcc15m"
    subset_name: str = "openai-yfcc100m-subset"  # which "YFCC15M" (SPEC §1: others differ)
    clean_mode: str = "slip"  # datasets/sources/yfcc.py: "slip" (exact) | "strict"
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset: no | border | keep_ratio | keep_ratio_largest | center_crop
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = 0.0  # 0 = unlimited; a decompression-bomb guard when set
    max_aspect_ratio: float = 0.0  # 0 = unlimited
    timeout: int = 10  # seconds per socket operation (img2dataset): connect, and each read
    # Bounds per image, enforced by our fetch (datasets/img2dataset_bounded.py); 0 = unbounded. The timeout
    # alone bounds neither a server that drips a byte per second nor an endless body. Memory held by
    # downloads is at most ~2 * thread_count * max_image_bytes per process (img2dataset's in-flight cap).
    download_deadline_s: float = 60.0  # total seconds for one image (per retry), redirects included
    max_image_bytes: int = 32 << 20  # response body bytes; a larger Content-Length is refused unread
    max_image_pixels: int = 89_478_485  # width*height from the header, checked before anything decodes (PIL's default cap)
    retries: int = 0
    compute_hash: str = "sha256"
    extract_exif: bool = False
    disallowed_header_directives: tuple = ("noai", "noimageai", "noindex", "noimageindex")
    number_sample_per_shard: int = 10000
    # Rows are handed to img2dataset in a seeded global permutation (datasets/plan.py), so a shard is a uniform
    # draw from the whole table, not a run of one Flickr user or upload day. Changes the grouping of rows into
    # shards, not what a download produces: not part of the work-folder identity (PLANNING_FIELDS).
    shuffle_seed: int = 0
    # Parallelism only: not part of the work-folder identity.
    processes_count: int = 16
    thread_count: int = 64
    shards_per_group: int = 64  # one img2dataset call (one mapped Prefect task) per group
    parallel_groups: int = 1
    subprocess_timeout_s: int = 7 * 24 * 3600
    # Dataset quality (datasets/quality/, issue 10; off by default): applied when publishing, it only turns
    # `success` rows into `filtered` + reason. Not part of the work-folder identity: nothing is re-downloaded.
    quality: QualityConfig = field(default_factory=QualityConfig)
    distributor: str = "multiprocessing"  # img2dataset distributor: multiprocessing | pyspark (datasets/img2dataset_spark.py)
    # Where the quality pass's perceptual hashes run (datasets/quality/hash_engines.py): "processes" (local
    # pool) | "dask://host:port" | "spark" | "spark://host:7077". Execution only: not part of any identity.
    hash_engine: str = "processes"

    def __post_init__(self):
        if self.distributor not in ("multiprocessing", "pyspark"):
            raise ValueError(f"DatasetConfig.distributor must be 'multiprocessing' or 'pyspark', got {self.distributor!r}")
        try:
            hash_engines.parse(self.hash_engine)
        except ValueError as e:
            raise ValueError(f"DatasetConfig.hash_engine: {e}") from None
        if self.clean_mode not in ("slip", "strict"):
            raise ValueError(f"DatasetConfig.clean_mode must be 'slip' or 'strict', got {self.clean_mode!r}")
        if self.resize_mode not in ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"):
            raise ValueError(f"DatasetConfig.resize_mode: unknown img2dataset resize mode {self.resize_mode!r}")
        for name in ("image_size", "number_sample_per_shard", "processes_count", "thread_count", "shards_per_group",
                     "parallel_groups", "timeout", "subprocess_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"DatasetConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("min_image_size", "max_image_area", "max_aspect_ratio", "retries", "download_deadline_s",
                     "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"DatasetConfig.{name} must be >= 0 (0 = unbounded/off), got {getattr(self, name)!r}")
        if not 0 <= self.encode_quality <= 100:
            raise ValueError(f"DatasetConfig.encode_quality must be in [0, 100], got {self.encode_quality!r}")


DATASET_PRESETS: dict[str, DatasetConfig] = {
    # SLIP's data: OpenAI's YFCC15M subset, short side 256 (SPEC §1 "Images"), 10k samples per shard.
    "yfcc15m": DatasetConfig(),
    # CC3M / CC12M through the same stage (url + caption tables).
    "cc3m": DatasetConfig(name="cc3m", subset_name="", retries=1),
    "cc12m": DatasetConfig(name="cc12m", subset_name="", retries=1),
    # make demo: 64 px squares from a local server, 2 cores.
    "tiny": DatasetConfig(name="demo", subset_name="demo-subset", image_size=64, resize_mode="center_crop",
                          resize_only_if_bigger=False, encode_quality=90, timeout=5, number_sample_per_shard=500,
                          processes_count=2, thread_count=16, shards_per_group=64, max_image_area=4.0e7),
}
PLANNING_FIELDS = {"shuffle_seed"}  # decide the grouping of new attempts only
PARALLEL_FIELDS = {"processes_count", "thread_count", "shards_per_group", "parallel_groups", "subprocess_timeout_s", "name", "distributor",
                   "hash_engine"}


def make_config(config: dict | None = None, preset: str | None = None) -> DatasetConfig:
    """DATASET_PRESETS[preset] (default yfcc15m) with overrides, through slip_core.config.resolve; `quality`
    may name a quality preset ("off" | "default" | "strict")."""
    return resolve(DATASET_PRESETS, preset or "yfcc15m", config, what="dataset", named={"quality": QUALITY_PRESETS})
