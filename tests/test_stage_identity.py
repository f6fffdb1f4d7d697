"""Which edits rerun which stages, said before anything runs — on the real flows (issue 16).

The session's tiny pipeline (tests/_stage_runs.tiny_pipeline: real img2dataset, torchrun, Prefect server)
is built once with this checkout. Each case copies our packages (plus README and tests) into tmp_path,
makes one edit there and asks `slip status --json` in a subprocess whose PYTHONPATH is the copy: the code
that runs is the code that is hashed, and nothing in the worktree is touched. Two cases then run
`slip reproduce` for real and check which stages published something: nothing for comment/help edits
(against a `slip server start` server the CLI finds by itself), only eval for an evaluation code edit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from slip_core import artifacts
from tests._stage_runs import tiny_pipeline, tiny_sets

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parent.parent
SLIP = os.path.join(os.path.dirname(sys.executable), "slip")
PACKAGES = ("slip_core", "datasets", "evaluation", "flows")
KIND = {"dataset": "dataset", "train": "checkpoint", "eval": "eval"}


def _copy(dest: Path) -> Path:
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", dest / "README.md")
    return dest


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    text = (root / rel).read_text()
    assert old in text, (rel, old)
    (root / rel).write_text(text.replace(old, new, 1))


def _append(root: Path, rel: str, code: str = "\nIDENTITY_TEST_EDIT = 1  # a real change to what the module does\n"):
    with open(root / rel, "a") as f:
        f.write(code)


def _module_path(name: str) -> str:
    """Path of one of our modules in the checkout (the evaluation package may live at top level)."""
    for candidate in (f"evaluation/{name}.py", f"slip_core/evaluation/{name}.py"):
        if (REPO / candidate).exists():
            return candidate
    raise FileNotFoundError(name)


def _env(root: Path, **extra) -> dict:
    from datasets.offline import data_dir

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # the copy's own .data would be empty: the eval data stays where this checkout keeps it
    return {**env, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "SLIP_DATA_DIR": str(data_dir()), **extra}


def _slip(root: Path, *argv: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    out = subprocess.run([SLIP, *argv], cwd=root, env=_env(root, **env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-4000:])
    return out


def _status(root: Path, store: str) -> dict:
    out = _slip(root, "status", "--store", store, "--json", *tiny_sets())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"--- slip status ({root.name}) ---\n" + json.dumps(result, indent=1))  # the cases' output, shown with -s
    return result["stages"]


@pytest.fixture(scope="module")
def built(prefect_server):
    return tiny_pipeline(prefect_server)


def _base_urls(result: dict) -> dict:
    """Per plan stage, its artifact: the demo's SLIP run and its CLIP baseline (stages train-clip, eval-clip)."""
    clip = result["baselines"]["clip"]
    return {"dataset": result["dataset"], "train": result["checkpoint"], "eval": result["eval"],
            "train-clip": clip["checkpoint"], "eval-clip": clip["eval"]}


def _result(out: subprocess.CompletedProcess) -> dict:
    """The URLs `slip reproduce` prints (a JSON object) from its stdout."""
    text = out.stdout
    return json.loads(text[text.index('{\n  "dataset"'): text.index("\n}") + 2])


def _reasons(stage: dict) -> str:
    return " | ".join(stage["reasons"])


def _mtimes(urls: dict) -> dict:
    return {k: os.path.getmtime(artifacts.local_path(u)) for k, u in urls.items()}


def test_comment_docstring_and_help_text_edits_rerun_nothing(built, tmp_path):
    store, result = built
    src = _copy(tmp_path / "src")
    _edit(src, "flows/cli_eval.py", '"zero-shot classification (SPEC §7)"', '"zero-shot classification, reworded"')
    _edit(src, "flows/pretrain.py", "    log = get_run_logger()\n    st = Store(store)",
          "    log = get_run_logger()  # a comment in a flow's task function\n    st = Store(store)")
    _edit(src, "slip_core/trainer.py", 'help="dataset manifest URL"', 'help="the dataset manifest URL to train on"')
    _edit(src, "slip_core/train_config.py", '"""Fill the \'reference default\' sentinels', '"""Reworded: fill the sentinels')
    _edit(src, "datasets/sources/yfcc.py", "\nimport html\n", "\n# a comment in caption cleaning code\nimport html\n")
    with open(src / "README.md", "a") as f:
        f.write("\nA line added to the README.\n")
    _edit(src, "tests/test_plan.py", "def test_flops", "# a comment in a test\ndef test_flops")
    stages = _status(src, store)
    base = _base_urls(result)
    assert {s: v["state"] for s, v in stages.items()} == dict.fromkeys(base, "cached")
    assert {s: v["artifact"] for s, v in stages.items()} == base

    # For real, against a persistent server that the CLI finds in the store without being told.
    before = _mtimes(base)
    started = _slip(src, "server", "start", "--store", store, "--port", "0")
    assert "Prefect server started: http://127.0.0.1:" in started.stdout
    try:
        info = json.loads((Path(store) / ".prefect" / "slip-server.json").read_text())
        assert "already running" in _slip(src, "server", "start", "--store", store).stdout
        out = _slip(src, "reproduce", "--store", store, *tiny_sets())
        assert _result(out)["eval"] == result["eval"]
        assert _mtimes(base) == before  # nothing republished
        logs = out.stdout + out.stderr
        assert "dataset: cached" in logs and "eval: cached" in logs  # the plan, logged by the flow
        req = urllib.request.Request(f"{info['url']}/flows/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:  # the run went to the store's server
            assert "reproduce" in {f["name"] for f in json.load(r)}
    finally:
        stopped = _slip(src, "server", "stop", "--store", store)
    assert f"Prefect server stopped (pid {info['pid']}" in stopped.stdout
    with pytest.raises(ProcessLookupError):
        os.killpg(info["pid"], 0)  # the whole process group is gone
    assert "no Prefect server running" in _slip(src, "server", "stop", "--store", store).stdout


def test_an_evaluation_code_edit_reruns_only_eval(built, tmp_path, prefect_server):
    from prefect.artifacts import Artifact

    store, result = built
    src = _copy(tmp_path / "src")
    zeroshot = _module_path("zeroshot")
    _append(src, zeroshot)
    stages = _status(src, store)
    assert [stages[s]["state"] for s in ("dataset", "train", "eval")] == ["cached", "cached", "run"]
    module = zeroshot[:-3].replace("/", ".")
    assert f"code changed: {module}" in _reasons(stages["eval"])
    base = _base_urls(result)
    assert stages["dataset"]["artifact"] == base["dataset"] and stages["train"]["artifact"] == base["train"]

    before = _mtimes({k: base[k] for k in ("dataset", "train")})
    out = _slip(src, "reproduce", "--store", store, *tiny_sets(), PREFECT_API_URL=prefect_server)
    urls = _result(out)
    assert urls["dataset"] == base["dataset"] and urls["checkpoint"] == base["train"] and urls["eval"] != base["eval"]
    assert _mtimes({k: base[k] for k in ("dataset", "train")}) == before
    new, old = artifacts.load_verified(urls["eval"]), artifacts.load_manifest(base["eval"])
    assert new.identity["code"]["modules"][module] != old.identity["code"]["modules"][module]
    assert f"eval: will run: code changed: {module}" in out.stdout + out.stderr
    plan = Artifact.get("reproduce-plan")
    assert plan is not None and module in plan.data


def test_trainer_edit_reruns_train_and_eval_not_the_dataset(built, tmp_path):
    store, _ = built
    src = _copy(tmp_path / "src")
    _append(src, "slip_core/trainer.py")
    stages = _status(src, store)
    assert [stages[s]["state"] for s in ("dataset", "train", "eval")] == ["cached", "run", "run"]
    assert "code changed: slip_core.trainer" in _reasons(stages["train"])
    assert "input changed: checkpoint" in _reasons(stages["eval"])


@pytest.mark.parametrize("module,table_too", [("datasets/sources/yfcc.py", True), ("datasets/download.py", False)],
                         ids=["caption-cleaning", "download"])
def test_dataset_code_edits_rerun_everything_downstream(built, tmp_path, module, table_too):
    store, _ = built
    src = _copy(tmp_path / "src")
    _append(src, module)
    stages = _status(src, store)
    assert [stages[s]["state"] for s in ("dataset", "train", "eval")] == ["run", "run", "run"]
    reasons = _reasons(stages["dataset"])
    assert ("caption table will be built first" in reasons) == table_too
    assert module[:-3].replace("/", ".") in reasons
    assert "input changed: dataset" in _reasons(stages["train"])


def test_a_library_version_change_reruns_the_stages_that_import_it(built, tmp_path):
    """timm is imported by the model code (train, eval), not by the dataset stage. A distribution's metadata
    earlier on sys.path is what importlib.metadata reports: the environment now says timm 99.0."""
    import timm

    store, _ = built
    src = _copy(tmp_path / "src")
    info = src / "timm-99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: timm\nVersion: 99.0\n")
    (info / "top_level.txt").write_text("timm\n")
    stages = _status(src, store)
    assert [stages[s]["state"] for s in ("dataset", "train", "eval")] == ["cached", "run", "run"]
    assert f"library changed: timm ({timm.__version__} -> 99.0)" in _reasons(stages["train"])
    assert "library changed: timm" in _reasons(stages["eval"])
