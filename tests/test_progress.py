"""Console progress (slip_core/progress.py): human lines when the console is not a terminal (the trainer's
real output included: its JSON records stay in metrics.jsonl), a tqdm bar with rate and ETA on a pseudo-TTY."""
import io
import json
import os
import pty
import select
import subprocess
import sys
import time

from slip_core import progress
from tests._train_util import fashion_samples, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", 'model_overrides={"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, '
        '"ssl_emb_dim": 32}', "--set", "max_steps=6", "--set", "log_every=2", "--set", "ckpt_every=6",
        "--set", "num_workers=0", "--set", "epochs=1", "--set", "samples_per_epoch=96", "--set", "batch_size=16"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **extra}


def _trainer_output(tmp_path) -> tuple[str, str]:
    dataset = write_dataset(str(tmp_path / "ds"), fashion_samples(96, seed=3), per_shard=48)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "slip_core.trainer", "--dataset", dataset, "--out", str(out), *TINY],
                         capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, str(out)


def test_non_tty_console_gets_human_lines_and_metrics_jsonl_keeps_the_records(tmp_path):
    stdout, out = _trainer_output(tmp_path)
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert not [ln for ln in lines if ln.lstrip().startswith("{")], stdout  # no raw JSON on the console
    steps = [progress.parse_step_line(ln) for ln in lines if ln.startswith("train: ")]
    assert [s[:2] for s in steps] == [(2, 6), (4, 6), (6, 6)], stdout
    assert all("loss" in s[2] and s[2]["samples/s"] > 0 for s in steps)
    assert "ETA" in next(ln for ln in lines if ln.startswith("train: 2/6"))
    records = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4, 6] and all("samples_per_s" in r for r in records)

    logged = []  # the same module in the flows' loops (download groups, eval datasets): one line per update
    with progress.Progress("eval", 3, "datasets", log=logged.append, stream=io.StringIO()) as bar:
        for name in ("mnist", "digits", "photos"):
            bar.update(1, last=name)
    assert logged[0].startswith("eval: 1/3 datasets (33%) · last mnist") and "ETA" in logged[0]
    assert logged[-1] == "eval: 3/3 datasets (100%) · last photos"
    sink = logged.append  # (one bound-method object)
    assert progress.relay(sink, io.StringIO()) is sink  # not a terminal: every line passes through


def _on_pty(code: str, stdin_text: str = "", timeout: float = 60) -> str:
    """Run `code` in a child whose stderr is a pseudo-terminal; returns what the terminal received."""
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=slave, env=_env(), cwd=REPO)
    os.close(slave)
    child.stdin.write(stdin_text.encode())
    child.stdin.close()
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif child.poll() is not None:
            break
    child.wait(timeout=10)
    os.close(master)
    assert child.returncode == 0, data.decode(errors="replace")
    return data.decode(errors="replace")


def test_pseudo_tty_shows_a_bar_with_rate_and_eta(tmp_path):
    shown = _on_pty("import time\nfrom slip_core.progress import Progress\n"
                    "with Progress('download', 4, 'groups') as bar:\n"
                    "    for i in range(4):\n        time.sleep(0.05)\n        bar.update(1, ok=f'{i}/4')\n")
    assert "download:" in shown and "\r" in shown and "|" in shown and "groups/s" in shown and "<" in shown, shown
    assert "100%" in shown and "4/4" in shown
    # The trainer's real output relayed by the launching process (flows/pretrain.py) onto a terminal.
    stdout, _ = _trainer_output(tmp_path)
    shown = _on_pty("import sys\nfrom slip_core import progress\nother = []\n"
                    "feed = progress.relay(other.append)\n"
                    "for line in sys.stdin:\n    feed(line.rstrip('\\n'))\n"
                    "print('PASSED:', len(other), file=sys.stderr)\n", stdin_text=stdout)
    assert "train:" in shown and "6/6" in shown and "steps/s" in shown and "loss=" in shown, shown
    assert "train: 2/6 steps (33%)" not in shown  # the step lines became the bar, not printed lines
    assert "PASSED: " in shown and "PASSED: 0" not in shown  # the trainer's other lines went on to the log
