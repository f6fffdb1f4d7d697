"""The pretraining entry with evaluation during training: slip_core.trainer's CLI plus the in-training
evaluation callback (evaluation/in_training.py). The pretraining flow launches this module under torchrun
(slip_core.launch.torchrun_command(module=...)); slip_core stays free of evaluation and dataset code.

    python -m torch.distributed.run --nproc_per_node=8 -m evaluation.train_entry \
        --dataset STORE/dataset/.../manifest.json --out RUN_DIR --preset slip_vitb16_yfcc15m_25ep
"""
from __future__ import annotations

import sys

from evaluation.in_training import callbacks_for
from slip_core import trainer


def main(argv: list[str] | None = None) -> int:
    return trainer.main(argv, callback_factories=(callbacks_for,))


if __name__ == "__main__":
    sys.exit(main())
