"""End to end with the real tools, each test in its own git repository copied from this one."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from conftest import ROOT, git_env, only_run, read_until, run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
TINY = dict(num_steps=2, depth=1, dim=32, warmup_step=1)


def tool_env() -> dict:
    env = git_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def ok(cmd, cwd, env=None) -> str:
    result = run(cmd, cwd, env or tool_env())
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_params(repo: Path, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit_tracked(dest: Path, **params) -> Path:
    """The tracked files of this repository in a fresh git repo at `dest`, with `params` set, committed."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    if params:
        set_params(dest, **params)
    ok(["git", "init", "-q"], dest)
    ok(["git", "add", "-A"], dest)
    ok(["git", "commit", "-qm", "copy"], dest)
    return dest


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The tracked files of this repository in a fresh git repo, with tiny params, committed."""
    return commit_tracked(tmp_path_factory.mktemp("template"), **TINY)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """This repository as a user finds it, its params.yaml untouched: what `git clone` is given."""
    return commit_tracked(tmp_path_factory.mktemp("published"))


@pytest.fixture
def repo(template, tmp_path) -> Path:
    """A copy of the template for one test: no test sees what another did."""
    return Path(shutil.copytree(template, tmp_path / "repo", symlinks=True))


def test_dvc_repro_then_a_depth_change_reruns_train_and_evaluate_only(repo):
    out = ok(["dvc", "repro"], repo)
    assert "Running stage 'check'" in out and "Running stage 'prepare'" in out and "Running stage 'evaluate'" in out
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1; two epochs of a tiny model get far above it
    assert (repo / "output" / "model.safetensors").is_file()
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "depth 1"], repo)
    assert "didn't change" in ok(["dvc", "repro"], repo)  # nothing to do
    first = only_run(repo / "checkpoints" / "output")
    kept = snapshot(first)

    set_params(repo, depth=2)
    out = ok(["dvc", "repro"], repo)
    assert "Running stage 'check'" in out and "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    (second,) = [p for p in (repo / "checkpoints" / "output").iterdir() if p.is_dir() and p != first]
    assert f"starting a new run in checkpoints/output/{second.name}; 1 other run(s) stay in checkpoints/output (" in out
    assert snapshot(first) == kept  # the depth-1 run's state stays, to continue when its params come back
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "depth 2"], repo)
    changed = json.loads(ok(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], repo))
    assert "reports/metrics.json" in changed and "accuracy" in changed["reports/metrics.json"]
    assert ok(["dvc", "params", "diff", "HEAD~1", "HEAD", "--json"], repo).count("depth") == 1


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bad_value_stops_dvc_repro_before_any_output_is_deleted(repo):
    ok(["dvc", "repro"], repo)
    before = snapshot(repo / "output"), snapshot(repo / "reports" / "train"), snapshot(repo / "prepared")
    set_params(repo, depth=0)
    result = run(["dvc", "repro"], repo, tool_env())
    assert result.returncode != 0
    assert "error: params.yaml: depth must be at least 1, got 0" in result.stdout + result.stderr
    assert "Running stage 'train'" not in result.stdout
    assert (snapshot(repo / "output"), snapshot(repo / "reports" / "train"), snapshot(repo / "prepared")) == before
    set_params(repo, depth=1)
    assert "didn't change" in ok(["dvc", "repro"], repo)  # the previous results still stand


def tree(root: Path) -> dict:
    """Every file of the workspace and the DVC cache, with its bytes; of dvc.lock, what the stages after
    `check` record (a `check` that passed the new params is recorded: DVC's own bookkeeping, as is the
    params.yaml that `dvc exp run -S` leaves set)."""
    skip = (".git/", ".dvc/tmp/", "params.yaml", "dvc.lock")
    files = {k: v for (k, v) in snapshot(root).items() if not k.startswith(skip)}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"].pop("check")
    return {**files, "dvc.lock": lock}


DANGEROUS = ["output_dir=data", "output_dir=mixer", "output_dir=mixer/m", "output_dir=reports", "output_dir=.",
             "output_dir=prepared", "output_dir=../outside", "checkpoint=output", "batch_size=5000", "variant=S/16"]


def test_dvc_exp_run_with_a_dangerous_value_changes_nothing(repo):
    """What DVC deletes before any command runs, and what only train can see, cost nothing the user had."""
    (repo / "data" / "mine").mkdir()
    (repo / "data" / "mine" / "untracked.png").write_bytes(b"nothing can bring this back")
    ok(["dvc", "repro"], repo)
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "trained"], repo)
    before = tree(repo)
    cached = {k for k in before if k.startswith(("output/", "prepared/"))}  # DVC's outs, in its cache
    for setting in DANGEROUS:
        result = run(["dvc", "exp", "run", "-S", setting], repo, tool_env())
        assert result.returncode != 0, (setting, result.stdout)
        assert "Traceback" not in result.stdout + result.stderr, setting
        assert {k: v for (k, v) in tree(repo).items() if k not in cached} == \
            {k: v for (k, v) in before.items() if k not in cached}, setting
        # a changed out path makes DVC take the old outs out of the workspace; its cache brings them back
        ok(["git", "checkout", "--", "params.yaml"], repo)
        ok(["dvc", "checkout"], repo)
        assert tree(repo) == before, setting


def test_dvc_exp_run_set_param_as_written(repo):
    ok(["dvc", "exp", "run", "-S", "depth=3"], repo)
    table = pd.read_csv(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo, tool_env()).stdout), dtype=str)
    assert "depth" in table.columns and "accuracy" in table.columns
    ours = table[table["depth"] == "3"]
    assert len(ours) >= 1 and float(ours["accuracy"].iloc[0]) > 0.5


def test_fine_tune_an_imported_checkpoint_through_dvc(repo):
    import torch
    from reference import as_timm, random_weights
    from safetensors.torch import save_file

    from mixer.checkpoint import load_model

    # a timm-layout model on the default grid (12×12 images, 3×3 patches: 16 patches), 5 classes
    weights = as_timm(random_weights(3, (3, 3), 16, 32, 16, 64, 1, 5))
    save_file({k: v.contiguous() for (k, v) in weights.items()}, str(repo / "timm.safetensors"))
    ok(["mixer", "import-weights", "timm.safetensors", "models/imported"], repo)
    set_params(repo, checkpoint="models/imported", num_steps=1, lr=1.0e-9, warmup_step=0)  # so little training that
    out = ok(["dvc", "exp", "run"], repo)                                                   # the features stay
    assert "new zero-initialised head for 10 classes" in out
    tuned, imported = load_model(repo / "output"), load_model(repo / "models" / "imported")
    assert (tuned.config.dim, tuned.config.depth, tuned.config.num_classes) == (32, 1, 10)
    images = torch.randn(4, 3, 12, 12)
    with torch.inference_mode():  # the imported weights were loaded: the same features before the head
        assert (tuned.forward_features(images) - imported.forward_features(images)).abs().max() < 1e-4
        control = load_model(repo / "models" / "imported")
        torch.nn.init.normal_(control.blocks[0].channel_mlp.fc1.weight)
        assert (control.forward_features(images) - imported.forward_features(images)).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["class_folders", "train_val"])
def test_a_fresh_clone_trains_on_a_photo_folder_setting_only_the_dataset(published, tmp_path, layout):
    """A newcomer's path: clone, put photos under data/, change the one line of params.yaml, dvc repro."""
    from conftest import make_photo_folder

    clone = tmp_path / "clone"
    ok(["git", "clone", "-q", str(published), str(clone)], tmp_path)
    shapes = clone / "data" / "shapes"
    classes = ["circle", "square", "star"]
    if layout == "class_folders":
        make_photo_folder(shapes, dict.fromkeys(classes, 40))
    else:  # timm's layout: the split is the folders'; test/ is cut from train/
        make_photo_folder(shapes / "train", dict.fromkeys(classes, 40))
        make_photo_folder(shapes / "val", dict.fromkeys(classes, 8), seed=1)
    params = (clone / "params.yaml").read_text()
    assert params.count("\ndataset: digits ") == 1
    (clone / "params.yaml").write_text(params.replace("\ndataset: digits ", "\ndataset: data/shapes "))
    ok(["dvc", "repro"], clone)
    report = json.loads((clone / "reports" / "data.json").read_text())
    assert report["classes"] == classes
    counts = {split: sum(c.values()) for (split, c) in report["counts"].items()}
    assert sum(counts.values()) == (120 if layout == "class_folders" else 144), counts
    if layout == "train_val":
        assert counts["val"] == 24, counts
    assert json.loads((clone / "output" / "config.json").read_text())["class_names"] == classes
    assert json.loads((clone / "reports" / "metrics.json").read_text())["accuracy"] > 1 / 3  # beats chance
    # the README's `dvc exp show` shows what people compare, and does not crash on a column name
    command = next(shlex.split(line.split("  #")[0]) for line in (ROOT / "README.md").read_text().splitlines()
                   if line.startswith("dvc exp show --drop"))
    table = ok([*command, "--no-pager", "--csv"], clone)
    header = table.splitlines()[0].split(",")
    assert {"Experiment", "accuracy", "dataset", "depth", "dim", "num_steps"} <= set(header), header
    assert len(header) <= 12, header
    assert "data/shapes" in table


# ---- preemption: dvc repro killed at any moment continues ---------------------------------------

def start_repro(repo: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(process.pid, sig)
    process.wait()


def held(folder: Path) -> Path:
    """A folder for MIXER_TEST_HOLD_AT_STEP (tests/hooks): the trainer marks it when it waits at its step."""
    folder.mkdir()
    return folder


def wait_held(process: subprocess.Popen, folder: Path) -> None:
    """Until the trainer under `process` waits at its step: a progress marker, not a guess at a step's time."""
    while not (folder / "held-0").exists():
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)


def test_dvc_repro_killed_at_any_moment_continues_to_the_same_weights(template, tmp_path):
    """SIGKILL to the whole process group before the first checkpoint, after a time-based mid-epoch one,
    and inside a checkpoint write; then SIGTERM; each time `dvc repro` again continues the run."""
    straight = Path(shutil.copytree(template, tmp_path / "straight"))
    repo = Path(shutil.copytree(template, tmp_path / "repo"))
    for r in (straight, repo):
        set_params(r, num_steps=3, hflip=0.5, mixup=0.2, dropout=0.1)
    ok(["dvc", "repro"], straight)
    env = tool_env()

    seen: list[str] = []
    run1 = start_repro(repo, env)
    read_until(run1, "Running stage 'train'", seen)
    kill_group(run1)  # before any checkpoint

    # tests/hooks: the checkpoint timer's clock moves 60 s at each reading (once a step), so a 90 s cadence
    # checkpoints at step 2 however fast the machine; the run then waits after step 3 until it is killed
    env.update(PYTHONPATH=str(ROOT / "tests" / "hooks"), MIXER_CHECKPOINT_EVERY="90s", MIXER_TEST_CLOCK_TICK="60",
               MIXER_TEST_HOLD_AT_STEP=f"3:{held(tmp_path / 'hold3')}")
    seen = []
    run2 = start_repro(repo, env)
    line = read_until(run2, "checkpoint: step", seen)
    assert "checkpoint: step 2 (epoch 1)" in line  # a time-based checkpoint inside an epoch
    wait_held(run2, tmp_path / "hold3")
    kill_group(run2)  # after that checkpoint, before any other
    assert not any("continuing" in s for s in seen)  # the first kill left nothing to continue from
    step, epoch = int(line.split("step ")[1].split(" ")[0]), int(line.split("(epoch ")[1].split(")")[0])
    folder = only_run(repo / "checkpoints" / "output")  # the run's own folder: checkpoints/output/<run>/
    assert (folder / "last.pt").is_file() and not (repo / "checkpoints" / "output" / "last.pt").exists()
    last = f"checkpoints/output/{folder.name}/last.pt"

    del env["MIXER_TEST_CLOCK_TICK"], env["MIXER_TEST_HOLD_AT_STEP"]
    env.update(MIXER_TEST_PAUSE_IN_WRITE=str(tmp_path / "writing"))
    seen = []
    run3 = start_repro(repo, env)
    while not (tmp_path / "writing").exists():
        assert run3.poll() is None, run3.stdout.read()
        time.sleep(0.02)
    kill_group(run3)  # inside a checkpoint write: its temporary file is there, last.pt is the previous one
    assert Path((tmp_path / "writing").read_text()).exists()
    assert Path((tmp_path / "writing").read_text()).parent == folder
    assert f"continuing from {last}: epoch {epoch}, step {step}" in run3.stdout.read()

    del env["MIXER_TEST_PAUSE_IN_WRITE"]
    env.update(MIXER_CHECKPOINT_EVERY="3", MIXER_TEST_HOLD_AT_STEP=f"{step + 4}:{held(tmp_path / 'hold')}")
    seen = []
    run4 = start_repro(repo, env)  # from `step`: a checkpoint 3 steps on, then it waits after the 4th
    read_until(run4, f"continuing from {last}: epoch {epoch}, step {step}", seen)
    read_until(run4, f"checkpoint: step {step + 3} ", seen)
    wait_held(run4, tmp_path / "hold")
    trainer = psutil.Process(int((tmp_path / "hold" / "held-0").read_text()))
    os.killpg(run4.pid, signal.SIGTERM)  # a preemption notice: the whole group gets it
    (tmp_path / "hold" / "release").write_text("")
    gone, alive = psutil.wait_procs([trainer], timeout=120)  # a failsafe: it stops after the step it is in
    assert gone and not alive
    run4.wait(timeout=120)

    log = ok(["dvc", "repro"], repo)
    continued = next(line for line in log.splitlines() if f"continuing from {last}" in line)
    assert only_run(repo / "checkpoints" / "output") == folder  # the same params throughout: one run's folder
    assert int(continued.split("step ")[1]) == step + 4  # it went on from where the SIGTERM stopped it
    same = load_file(str(straight / "output" / "model.safetensors"))
    resumed = load_file(str(repo / "output" / "model.safetensors"))
    assert max((same[k] - resumed[k]).abs().max().item() for k in same) <= 1e-6
    rows = (repo / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2"]  # each epoch once
    assert "Data and pipelines are up to date" in ok(["dvc", "status"], repo)


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/dash"])
def test_killing_dvc_alone_stops_its_training_instead_of_orphaning_it(repo, shell, tmp_path):
    """Only `dvc repro` is killed (not its process group): `mixer train` gets a SIGTERM, checkpoints and
    stops; the next `dvc repro` continues. DVC runs the command through $SHELL: bash replaces itself
    with it (DVC is its parent), dash stays in between (DVC is its grandparent)."""
    set_params(repo, num_steps=30)
    env = dict(tool_env(), MIXER_CHECKPOINT_EVERY="5", SHELL=shell, PYTHONPATH=str(ROOT / "tests" / "hooks"),
               MIXER_TEST_HOLD_AT_STEP=f"6:{held(tmp_path / 'hold')}")  # the trainer waits after step 6
    seen: list[str] = []
    dvc = start_repro(repo, env)
    read_until(dvc, "checkpoint: step 5 ", seen)
    wait_held(dvc, tmp_path / "hold")
    trainer = psutil.Process(int((tmp_path / "hold" / "held-0").read_text()))
    assert trainer in psutil.Process(dvc.pid).children(recursive=True) and trainer.name() not in ("bash", "dash")
    assert (trainer.ppid() == dvc.pid) == (shell == "/bin/bash")
    dvc.kill()
    dvc.wait()
    # the trainer writes to the pipe DVC had: its word that the signal came, then it may go on
    read_until(dvc, "SIGTERM: finishing this step and writing a checkpoint", seen)
    (tmp_path / "hold" / "release").write_text("")
    gone, alive = psutil.wait_procs([trainer], timeout=120)  # a failsafe: it stops after step 6
    assert gone and not alive, "mixer train kept running without its dvc repro"
    assert "stopped by SIGTERM: stopped at epoch 1, step 6;" in dvc.stdout.read()
    log = ok(["dvc", "repro"], repo)
    folder = only_run(repo / "checkpoints" / "output")
    assert f"continuing from checkpoints/output/{folder.name}/last.pt: epoch 1, step 6" in log


# ---- sharing the DVC way: a remote, a fresh clone, the model artifact, a queued grid -------------

def test_push_then_a_fresh_clone_pulls_and_predicts_without_training(repo, tmp_path):
    from conftest import make_image_folder

    ok(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    ok(["dvc", "repro"], repo)
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "trained"], repo)
    ok(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    ok(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    ok(["dvc", "pull"], clone)
    status = ok(["dvc", "status"], clone)
    assert "up to date" in status, status
    model = (repo / "output" / "model.safetensors").read_bytes()
    assert (clone / "output" / "model.safetensors").read_bytes() == model
    make_image_folder(clone / "photos", {"x": 3}, size=(12, 12))
    ok(["mixer", "predict", "photos", "--out", "predictions.csv"], clone)
    assert len(pd.read_csv(clone / "predictions.csv")) == 3
    assert not (clone / "checkpoints").exists()  # nothing was trained there
    ok(["git", "tag", "-a", "mixer-model@v1.0.0", "-m", "register"], repo)  # what `gto register` writes
    ok(["dvc", "artifacts", "get", str(repo), "mixer-model", "-o", str(tmp_path / "fetched")], tmp_path)
    assert (tmp_path / "fetched" / "model.safetensors").read_bytes() == model


def test_a_queued_grid_on_a_tracked_folder_ranks_and_applies(repo):
    from conftest import make_image_folder

    make_image_folder(repo / "data" / "shapes", {"a": 30, "b": 30}, size=(12, 12))
    ok(["dvc", "add", "data/shapes"], repo)
    set_params(repo, dataset="data/shapes", num_classes=None, batch_size=16)
    ok(["git", "add", "-A"], repo)
    ok(["git", "commit", "-qm", "shapes"], repo)
    ok(["dvc", "exp", "run", "--queue", "-S", "depth=1,2"], repo)
    ok(["dvc", "queue", "start", "--jobs", "1"], repo)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        queue = ok(["dvc", "queue", "status"], repo)
        if not any(word in queue for word in ("Queued", "Running")):
            break
        time.sleep(3)
    failed = [line.split()[0] for line in queue.splitlines() if "Failed" in line]
    assert queue.count("Success") == 2, queue + "".join(run(["dvc", "queue", "logs", name], repo, tool_env()).stdout
                                                        for name in failed)
    csv = ok(["dvc", "exp", "show", "--csv", "--sort-by", "reports/metrics.json:accuracy", "--sort-order", "desc"],
             repo)
    table = pd.read_csv(io.StringIO(csv[csv.index("Experiment"):]), dtype=str)
    runs = table[table["depth"].isin(["1", "2"]) & table["Experiment"].notna() & (table["Experiment"] != "")]
    assert sorted(runs["depth"]) == ["1", "2"], table
    best = runs.iloc[0]
    ok(["dvc", "exp", "apply", best["Experiment"]], repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["depth"] == int(best["depth"])
    assert json.loads((repo / "reports" / "metrics.json").read_text())["accuracy"] == float(best["accuracy"])


@pytest.mark.parametrize("multiple", [1, 2])
def test_fine_tune_from_an_offline_hub_cache_with_the_finetune_preset(repo, tmp_path, multiple):
    """presets/finetune.yaml as a user takes it: copied to params.yaml, the dataset and checkpoint named, and
    image_shape the checkpoint's (1) or twice it (2: the token mixing expanded as the paper does)."""
    import torch
    from conftest import make_photo_folder
    from test_pretrained import COMMIT, add_snapshot, timm_weights

    from mixer.checkpoint import load_model

    add_snapshot(tmp_path / "hf", "someone/mixer-tiny", COMMIT, timm_weights(0))  # 16x20 images, 4x4 patches
    env = {**tool_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    make_photo_folder(repo / "data" / "shapes", {"circle": 12, "square": 12, "star": 12})
    shutil.copy(ROOT / "presets" / "finetune.yaml", repo / "params.yaml")
    shape = [16 * multiple, 20 * multiple]
    set_params(repo, dataset="data/shapes", checkpoint="hf-hub:someone/mixer-tiny", image_shape=shape,
               num_steps=1, warmup_step=0, lr=1.0e-9, batch_size=8, eval_batch_size=16)  # the features stay
    ok(["dvc", "repro"], repo, env)
    tuned = load_model(repo / "output")
    assert (list(tuned.config.image_shape), tuned.config.token_hidden) == (shape, 8 * multiple ** 2)
    config = json.loads((repo / "output" / "config.json").read_text())
    assert config["source"]["fine_tuned_from"]["hub"] == "someone/mixer-tiny"
    assert config["source"]["fine_tuned_from"]["revision"] == COMMIT
    assert config["preprocessing"]["std"] == [0.229, 0.224, 0.225]  # the hub's normalisation, kept
    assert json.loads((repo / "reports" / "metrics.json").read_text())["accuracy"] >= 0
    ok(["mixer", "import-weights", "hf-hub:someone/mixer-tiny", str(tmp_path / "source"), "--image-shape",
        *map(str, shape)], repo, env)
    source = load_model(tmp_path / "source")
    images = torch.randn(4, 3, *shape)
    with torch.inference_mode():  # the hub's weights, expanded: the same features before the head
        assert (tuned.forward_features(images) - source.forward_features(images)).abs().max() < 1e-4


def test_a_checkpoint_at_a_size_its_grid_does_not_divide_stops_dvc_repro_in_check(repo, tmp_path):
    from test_pretrained import COMMIT, add_snapshot, timm_weights

    add_snapshot(tmp_path / "hf", "someone/mixer-tiny", COMMIT, timm_weights(0))
    env = {**tool_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    ok(["dvc", "repro"], repo)
    before = snapshot(repo / "output"), snapshot(repo / "reports"), snapshot(repo / "prepared")
    set_params(repo, checkpoint="hf-hub:someone/mixer-tiny")  # the digits' 12x12 with a 16x20 checkpoint
    result = run(["dvc", "repro"], repo, env)
    assert result.returncode != 0
    assert ("error: checkpoint hf-hub:someone/mixer-tiny: image_shape [12, 12] does not fit weights whose token "
            "mixing is tied to a 4x5 grid of 4x4 patches: give their own [16, 20]") in result.stdout + result.stderr
    assert "Running stage 'prepare'" not in result.stdout
    assert (snapshot(repo / "output"), snapshot(repo / "reports"), snapshot(repo / "prepared")) == before