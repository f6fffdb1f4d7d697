"""`python -m datasets.quality MANIFEST`: what the quality pass would remove from a published dataset, and why."""
from __future__ import annotations

import argparse
import json
import sys

from datasets.quality.apply import audit
from datasets.quality.config import QUALITY_PRESETS, make_quality_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="audit a published dataset: what the quality pass would remove, and why")
    ap.add_argument("manifest", help="dataset manifest URL")
    ap.add_argument("--preset", default="default", choices=sorted(QUALITY_PRESETS))
    ap.add_argument("--config", default="{}", help="JSON dict of QualityConfig overrides")
    a = ap.parse_args(argv)
    report = audit(a.manifest, make_quality_config(json.loads(a.config), a.preset))
    print(json.dumps(report, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
