"""`slip reproduce --dry-run` plans and the analytic compute estimate."""
import subprocess
import sys
import os

from slip_core import compute
from slip_core.registry import MODEL_PRESETS


def test_flops_match_published_profile():
    # open_clip's model_profile lists ViT-B-16 image+text forward at 41.09 GFLOPs (PEERS.md B.3).
    f = compute.flops_per_sample(MODEL_PRESETS["CLIP_VITB16"]).forward / 1e9
    assert abs(f - 41.09) / 41.09 < 0.01
    slip, clip = (compute.flops_per_sample(MODEL_PRESETS[n]).forward for n in ("SLIP_VITB16", "CLIP_VITB16"))
    assert 2.5 < slip / clip < 3.0  # three image passes + text (SPEC §0: ~3x the image activations)


def test_dry_run_prints_paper_step_counts():
    exe = os.path.join(os.path.dirname(sys.executable), "slip")
    out = subprocess.run([exe, "reproduce", "--preset", "slip_vitb16_yfcc15m_25ep", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # SPEC §9.7: 14,689,580 rows, batch 4096, drop_last -> 3,586 steps/epoch; 25 epochs = 89,650 steps.
    assert "3,586 steps = 89,650 steps" in out.stdout
    assert "warmup 3,586 steps" in out.stdout
    assert "lr 0.003 wd 0.1" in out.stdout  # SLIP reference hyper-parameters (SPEC §6)
    assert "GPU-hours" in out.stdout
