"""The install itself: stdlib dataclasses (img2dataset's backport removed), CLI entry point."""
import dataclasses
import os
import subprocess
import sys
import sysconfig


def test_dataclasses_is_stdlib():
    # img2dataset depends on the 'dataclasses' 0.6 backport; it breaks Prefect's server subprocess.
    assert os.path.dirname(dataclasses.__file__) == sysconfig.get_paths()["stdlib"], dataclasses.__file__
    assert hasattr(dataclasses, "KW_ONLY")


def test_slip_help_lists_stages():
    exe = os.path.join(os.path.dirname(sys.executable), "slip")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for stage in ("dataset", "train", "eval", "reproduce", "serve", "bench"):
        assert f"  {stage} " in out.stdout, out.stdout
