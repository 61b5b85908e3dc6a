"""End to end with the real tools, in a temporary git repository copied from this one."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, git_env, run

pytestmark = pytest.mark.slow
TINY = dict(num_steps=2, depth=1, dim=32, warmup_step=1)


def tool_env() -> dict:
    env = git_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def ok(cmd, cwd) -> str:
    result = run(cmd, cwd, tool_env())
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tracked files of this repository in a fresh git repo, with tiny params, committed."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params.update(TINY)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ok(["git", "init", "-q"], dest)
    ok(["git", "add", "-A"], dest)
    ok(["git", "commit", "-qm", "copy"], dest)
    return dest


def test_dvc_repro_then_a_depth_change_reruns_train_and_evaluate_only(repo):
    out = ok(["dvc", "repro"], repo)
    assert "Running stage 'prepare'" in out and "Running stage 'evaluate'" in out
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "top5_accuracy", "loss"} and 0 <= metrics["accuracy"] <= 1
    assert (repo / "output" / "model.safetensors").is_file()
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "depth 1"], repo)
    assert "didn't change" in ok(["dvc", "repro"], repo)  # nothing to do

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["depth"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = ok(["dvc", "repro"], repo)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "depth 2"], repo)
    diff = ok(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], repo)
    changed = json.loads(diff)
    assert "reports/metrics.json" in changed and "accuracy" in changed["reports/metrics.json"]
    assert ok(["dvc", "params", "diff", "HEAD~1", "HEAD", "--json"], repo).count("depth") == 1


def test_dvc_exp_run_set_param_as_written(repo):
    ok(["dvc", "exp", "run", "-S", "depth=3"], repo)
    table = pd.read_csv(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo, tool_env()).stdout), dtype=str)
    assert "depth" in table.columns and "accuracy" in table.columns
    ours = table[table["depth"] == "3"]
    assert len(ours) >= 1 and 0 <= float(ours["accuracy"].iloc[0]) <= 1


def test_fine_tune_an_imported_checkpoint_through_dvc(repo):
    from reference import as_timm, random_weights
    from safetensors.torch import save_file

    # a timm-layout model on the default grid (12×12 images, 3×3 patches: 16 patches), 5 classes
    weights = as_timm(random_weights(3, (3, 3), 16, 32, 16, 64, 1, 5))
    save_file({k: v.contiguous() for (k, v) in weights.items()}, str(repo / "timm.safetensors"))
    ok(["mixer", "import-weights", "timm.safetensors", "models/imported"], repo)
    out = ok(["dvc", "exp", "run", "-S", "checkpoint=models/imported"], repo)
    assert "new zero-initialised head for 10 classes" in out
    arch = json.loads((repo / "output" / "config.json").read_text())["architecture"]
    assert (arch["dim"], arch["depth"], arch["num_classes"], arch["token_hidden"]) == (32, 1, 10, 16)
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1


def test_dvc_repro_on_a_user_image_folder(repo):
    from conftest import make_image_folder

    make_image_folder(repo / "data" / "shapes", {"circle": 40, "square": 40, "star": 40}, size=(20, 16))
    ok(["dvc", "exp", "run", "-S", "data=data/shapes", "-S", "num_classes=null", "-S", "checkpoint=null"], repo)
    report = json.loads((repo / "reports" / "data.json").read_text())
    assert report["classes"] == ["circle", "square", "star"]
    assert sum(sum(c.values()) for c in report["counts"].values()) == 120
    assert json.loads((repo / "output" / "config.json").read_text())["class_names"] == ["circle", "square", "star"]
