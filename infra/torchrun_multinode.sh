#!/usr/bin/env bash
# Launch the trainer (slip_core.trainer, with in-training evaluation: evaluation.train_entry) on this node with
# torchrun's c10d rendezvous; run the same script on every node.
#
#   NNODES=8 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example:29400 RUN_ID=slip-b16-yfcc15m \
#   DATASET=s3://bucket/slip/dataset/yfcc15m-.../manifest.json OUT=s3://bucket/slip/runs/slip-b16 \
#   PRESET=slip_vitb16_yfcc15m_25ep infra/torchrun_multinode.sh [--set key=value ...]
#
# OUT must be storage every node can read (s3://, gs://, NFS): rank 0 writes checkpoints, every rank reads
# `checkpoints/latest` on restart, so rerunning this script after a crash/preemption resumes exactly.
set -euo pipefail
: "${DATASET:?dataset manifest URL}" "${OUT:?run directory URL (shared)}" "${RDZV_ENDPOINT:?host:port of the rendezvous}"
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
RUN_ID=${RUN_ID:-slip}
PRESET=${PRESET:-slip_vitb16_yfcc15m_25ep}
PYTHON=${PYTHON:-python}
# The c10d rendezvous elects a store host among the nodes, so no node needs a fixed rank; --max-restarts
# lets torchrun restart all local workers after a failure (they resume from checkpoints/latest).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RUN_ID" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m evaluation.train_entry --dataset "$DATASET" --out "$OUT" --preset "$PRESET" --resume latest "$@"
