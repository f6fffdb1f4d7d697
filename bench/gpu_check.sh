#!/usr/bin/env bash
# The device check (issue 17 item 7): everything that needs a GPU, in one run of under 8 minutes.
#
#   bench/gpu_check.sh [--out DIR] [--skip STAGES] [--wheels DIR] [--dry-run]
#   bench/gpu_check.sh --fetch-wheels DIR        # on a machine with PyPI: wheels for a GPU box without it
#
# Stages (each result is one JSON line on stdout, also appended to DIR/gpu_check.jsonl):
#   env    python, torch, CUDA, GPUs, packages
#   step   SLIP_VITB16 bf16 training step, batch 64: eager / grad-checkpointing / torch.compile —
#          samples/s, MFU, peak memory (bench/gpu_step.py)
#   train  50-step tiny SLIP on the GPU, then cut at 25 and resumed: bit-identical? (bench/gpu_check.py train)
#   eval   zero-shot + linear probe of that checkpoint on the local eval sets, device cuda (gpu_check.py eval)
#   nccl   with >= 2 GPUs: 2-process NCCL DDP losses/gradients vs a full-batch reference
#          (tests/dist_scripts/losses_equivalence.py)
# Python: the repository's .venv when it has torch, else the system python3 with torch; packages it lacks are
# installed into DIR/site with `python -m pip install --target` — from --wheels DIR (or ./.whl) when given,
# else from PyPI. With no python that has torch, a venv is created in DIR/venv from PyPI.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$REPO/gpu_check_out}
WHEELS=""
SKIP=""
DRY=0
STAGES="env step train eval nccl"
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-470}  # stages that would start past it are skipped (the limit is 8 min)
# Packages the check imports that a bare GPU image may lack (pure-python wheels), pinned to the project's.
NEEDED="open_clip_torch==3.3.0 webdataset==0.2.111 ftfy==6.3.1 braceexpand==0.1.7 wcwidth==0.9.4"
MODULES="torch timm open_clip webdataset cv2 fsspec sklearn skimage PIL numpy"

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }
line() {  # name status [extra json fields, already formatted]
    local rec="{\"name\": \"$1\", \"status\": \"$2\"${3:+, $3}}"
    echo "$rec"
    [ "$DRY" = 1 ] || echo "$rec" >>"$OUT_DIR/gpu_check.jsonl"
}

fetch_wheels() {
    mkdir -p "$1" || die "cannot create $1"
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$1" $NEEDED
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR=$2; shift 2 ;;
        --skip) [ $# -ge 2 ] || die "--skip needs a comma-separated list of: $STAGES"; SKIP=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS=$2; shift 2 ;;
        --fetch-wheels) [ $# -ge 2 ] || die "--fetch-wheels needs a directory"; fetch_wheels "$2"; exit $? ;;
        --dry-run) DRY=1; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
for s in ${SKIP//,/ }; do
    case " $STAGES " in *" $s "*) ;; *) die "--skip: unknown stage '$s' (stages: $STAGES)" ;; esac
done
skipped() { case ",$SKIP," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
[ -n "$WHEELS" ] || { [ -d "$REPO/.whl" ] && WHEELS="$REPO/.whl"; }
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels: $WHEELS is not a directory"
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# ------------------------------------------------------------------------------------------ python
PY=""
if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import torch' 2>/dev/null; then
    PY="$REPO/.venv/bin/python"
elif command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
    PY=$(command -v python3)
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
install_missing() {  # modules its python lacks -> DIR/site (wheels dir, else PyPI)
    local missing
    missing=$("$PY" - "$MODULES" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
EOF
)
    [ -z "$missing" ] && return 0
    echo "gpu_check: $PY lacks: $missing; installing into $OUT_DIR/site" >&2
    local src=()
    [ -n "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-deps --no-compile --target "$OUT_DIR/site" "${src[@]}" $NEEDED >&2 \
        || { line gpu_check_setup failed "\"reason\": \"pip could not install $NEEDED (no network? pass --wheels DIR from --fetch-wheels)\""; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$OUT_DIR/site"
}
if [ "$DRY" = 1 ]; then
    line gpu_check_plan planned "\"python\": \"${PY:-create $OUT_DIR/venv}\", \"out\": \"$OUT_DIR\", \"wheels\": \"$WHEELS\""
    for s in $STAGES; do skipped "$s" && line "gpu_check_$s" skipped "\"reason\": \"--skip\"" || line "gpu_check_$s" planned; done
    exit 0
fi
if [ -z "$PY" ]; then  # no python with torch at all: a venv from PyPI (CUDA wheels of torch included)
    python3 -m venv "$OUT_DIR/venv" && "$OUT_DIR/venv/bin/python" -m pip install -q torch torchvision timm \
        opencv-python-headless fsspec scikit-learn scikit-image pillow numpy pyarrow >&2 \
        || { line gpu_check_setup failed "\"reason\": \"no python with torch, and creating a venv from PyPI failed\""; exit 1; }
    PY="$OUT_DIR/venv/bin/python"
fi
install_missing
# the repository's .data may be a link to another machine's folder: local eval sets go under DIR then
[ -d "$REPO/.data" ] || export SLIP_DATA_DIR="$OUT_DIR/data"
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1

# ------------------------------------------------------------------------------------------ stages
start=$SECONDS
run_stage() {  # name timeout_s command...
    local name=$1 limit=$2 rc
    shift 2
    if skipped "$name"; then line "gpu_check_$name" skipped "\"reason\": \"--skip\""; return; fi
    if [ $((SECONDS - start + limit)) -gt "$DEADLINE_S" ]; then
        line "gpu_check_$name" skipped "\"reason\": \"would pass the ${DEADLINE_S} s budget\""; return
    fi
    "$@" 2>>"$OUT_DIR/gpu_check.log" | tee -a "$OUT_DIR/gpu_check.jsonl"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || line "gpu_check_$name" failed "\"rc\": $rc, \"log\": \"$OUT_DIR/gpu_check.log\""
}
run_stage env 60 "$PY" "$REPO/bench/gpu_check.py" env
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    for s in step train eval nccl; do line "gpu_check_$s" skipped "\"reason\": \"no CUDA device\""; done
    exit 0
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
run_stage step 200 timeout 200 "$PY" "$REPO/bench/gpu_step.py" --model SLIP_VITB16 --batch 64 --steps 20 --warmup 5 \
    --variants eager,ckpt,compile
run_stage train 150 timeout 150 "$PY" "$REPO/bench/gpu_check.py" train --out "$OUT_DIR/train" --steps 50
run_stage eval 90 timeout 90 "$PY" "$REPO/bench/gpu_check.py" eval --out "$OUT_DIR" \
    --checkpoint "$OUT_DIR/train/full/checkpoint.pt"
if [ "$GPUS" -ge 2 ]; then
    nccl() {
        SLIP_DIST_BACKEND=nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
            "$REPO/tests/dist_scripts/losses_equivalence.py" "$OUT_DIR/nccl.json" >&2 \
            && "$PY" "$REPO/bench/gpu_check.py" nccl --result "$OUT_DIR/nccl.json"
    }
    run_stage nccl 90 timeout 90 bash -c "$(declare -f nccl); PY='$PY' REPO='$REPO' OUT_DIR='$OUT_DIR' nccl"
else
    line gpu_check_nccl skipped "\"reason\": \"$GPUS GPU(s): the NCCL equivalence needs 2\""
fi
line gpu_check_done ok "\"seconds\": $((SECONDS - start))"
