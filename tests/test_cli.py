"""The `mixer` command: both flag spellings, per-run overrides, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ROOT, make_image_folder, make_project, write_params
from pipeline.cli import app
from pipeline.params import KEYS, STAGES, stage_keys

ORIGINAL_FLAGS = ["image_shape", "patch_shape", "depth", "dim", "num_classes", "checkpoint", "output_dir",
                  "batch_size", "lr", "momentum", "decay", "num_steps", "warmup_step", "scheduler"]
TINY = ["--depth", "1", "--dim", "16", "--batch-size", "8", "--warmup-step", "0", "--no-progress"]


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with params.yaml pointing at a small image folder, prepared at 8×8."""
    monkeypatch.chdir(make_project(tmp_path))
    return tmp_path


def test_train_help_lists_every_original_flag_in_both_spellings(runner):
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for flag in ORIGINAL_FLAGS:
        assert f"--{flag.replace('_', '-')}" in result.output
        if "_" in flag:
            assert f"--{flag}" in result.output
    assert "original train.py: 256 256" in result.output  # each default is stated
    flat = " ".join(result.output.replace("│", " ").split())
    assert "keep 'no' on CPU" in flat and "[env var: MIXER_CHECKPOINT_EVERY]" in flat  # the command's own options


def test_prepare_train_evaluate_with_original_spellings(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert json.loads((project / "reports" / "data.json").read_text())["classes"] == ["a", "b", "c"]
    result = runner.invoke(app, ["train", "--image_shape", "8", "8", "--patch_shape", "4", "4", "--num_steps", "1",
                                 "--output_dir", "run1", *TINY])
    assert result.exit_code == 0, result.output
    arch = json.loads((project / "run1" / "config.json").read_text())["architecture"]
    assert (arch["patch_shape"], arch["depth"], arch["dim"]) == ([4, 4], 1, 16)
    assert yaml.safe_load((project / "params.yaml").read_text())["depth"] == 4  # overrides are for one run
    result = runner.invoke(app, ["evaluate", "--output-dir", "run1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["top5_accuracy"] is None  # 3 classes: no top-5
    for name in ("per_class.csv", "confusion.csv", "README.md", "figures/confusion.png", "figures/mistakes.png",
                 "figures/learning_curves.png"):
        assert (project / "reports" / name).is_file(), name


def test_typer_spellings_work_too(runner, project):
    runner.invoke(app, ["prepare", "--workers", "1"])
    result = runner.invoke(app, ["train", "--image-shape", "8", "8", "--patch-shape", "2", "2", "--num-steps", "1",
                                 "--output-dir", "run2", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((project / "run2" / "config.json").read_text())["architecture"]["patch_shape"] == [2, 2]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--depth", "0"], "error: params.yaml: depth must be at least 1, got 0"),
    (["train", "--image-shape", "9", "9"], "error: params.yaml: image_shape [9, 9] is not divisible by patch_shape [2, 2]; "
     "patch_shape [3, 3] divides it"),
    (["train", "--scheduler", "step"], "error: params.yaml: scheduler must be 'cosine' or 'linear', got 'step'"),
    (["train", "--params", "missing.yaml"], "error: params file missing.yaml does not exist"),
    (["train", "--mixed-precision", "fp8"], "error: --mixed-precision must be no, bf16 or fp16, got 'fp8'"),
    (["prepare", "--data", "nowhere"], "error: data folder nowhere does not exist"),
    (["evaluate", "--output-dir", "nothing"], "error: model directory nothing does not exist"),
    (["train", "--seed", "-1"], "error: params.yaml: seed must be in 0 .. 2**32 - 1, got -1"),
    (["train", "--seed", str(10**18)], "error: params.yaml: seed must be in 0 .. 2**32 - 1, got " + str(10**18)),
    (["train", "--seed", str(10**23)], "error: params.yaml: seed must be an integer between -2**63 and 2**63 - 1 (about 9.2e18), got one of "
                                       "24 digits"),
    (["train", "--checkpoint-every", "soon"], "error: --checkpoint-every must be a number of steps (500) or a time "
                                              "(90s, 10m, 2h), got 'soon'"),
    (["train", "--params", "."], "error: . is a folder; give a params file"),
    (["train", "--batch-size", "1000"], "error: batch_size 1000 × grad_accum 1 × 1 process(es) exceeds the 27 "
                                          "training images; lower batch_size"),
])
def test_bad_values_are_one_line_and_exit_2(runner, project, args, message):
    if "--batch-size" in args:
        runner.invoke(app, ["prepare", "--workers", "1"])
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert "Traceback" not in result.output


def test_a_bad_value_overwrites_nothing(runner, project):
    runner.invoke(app, ["prepare", "--workers", "1"])
    assert runner.invoke(app, ["train", "--num-steps", "1", "--output-dir", "kept", *TINY]).exit_code == 0
    before = (project / "kept" / "model.safetensors").read_bytes()
    cache = (project / "prepared" / "images.npy").read_bytes()
    assert runner.invoke(app, ["train", "--output-dir", "kept", "--lr", "-1"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--val-fraction", "0.9"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--data", "nowhere"]).exit_code == 2
    assert (project / "kept" / "model.safetensors").read_bytes() == before
    assert (project / "prepared" / "images.npy").read_bytes() == cache


def test_non_numbers_are_rejected_by_the_parser(runner, project):
    result = runner.invoke(app, ["train", "--depth", "six"])
    assert result.exit_code == 2 and "depth" in result.output


def test_fine_tuning_takes_the_checkpoints_input_size_or_a_multiple_and_nothing_else(runner, project):
    from mixer.checkpoint import save_model
    from mixer.model import create_model

    save_model(create_model(image_shape=(16, 16), patch_shape=(4, 4), depth=1, dim=16, num_classes=3), project / "ck")
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0  # 8x8, as params.yaml says
    for command in ("check", "prepare", "train"):
        result = runner.invoke(app, [command, "--checkpoint", "ck"] + (TINY if command == "train" else []))
        assert result.exit_code == 2 and result.output == (
            "error: checkpoint ck: image_shape [8, 8] does not fit weights whose token mixing is tied to a 4x4 "
            "grid of 4x4 patches: give their own [16, 16] or a whole multiple per side, e.g. [32, 32] "
            "(fine-tuning at a higher resolution)\n"), (command, result.output)
    assert json.loads((project / "prepared" / "prepared.json").read_text())["image_shape"] == [8, 8]  # kept
    bigger = ["--checkpoint", "ck", "--image-shape", "32", "16"]
    assert runner.invoke(app, ["prepare", "--workers", "1", *bigger]).exit_code == 0
    assert json.loads((project / "prepared" / "prepared.json").read_text())["image_shape"] == [32, 16]
    result = runner.invoke(app, ["train", *bigger, *TINY])
    assert result.exit_code == 0, result.output
    assert "patch_shape = (4, 4) from checkpoint ck (params say (2, 2))" in result.output
    architecture = json.loads((project / "output" / "config.json").read_text())["architecture"]
    assert (architecture["image_shape"], architecture["token_hidden"]) == ([32, 16], 2 * 8)


def test_freeze_features_trains_only_the_head(runner, project):
    from safetensors.torch import load_file

    from mixer.checkpoint import save_model
    from mixer.model import create_model

    save_model(create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=16, num_classes=3), project / "ck")
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    result = runner.invoke(app, ["train", "--checkpoint", "ck", "--freeze", "features", *TINY])
    assert result.exit_code == 0, result.output
    before, after = load_file(str(project / "ck" / "model.safetensors")), load_file(str(project / "output" / "model.safetensors"))
    assert set(before) == set(after)
    for (name, tensor) in before.items():
        if name.startswith("head."):
            assert not torch.equal(after[name], tensor), name  # the head learned
        else:
            assert torch.equal(after[name], tensor), name  # every feature weight is the checkpoint's
    result = runner.invoke(app, ["train", "--freeze", "features", *TINY])
    assert result.exit_code == 2 and "freeze: features trains only the head, so it needs a checkpoint" in result.output


def snapshot(root):
    """Every file under root with its bytes: what 'nothing changed' is checked against."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(runner, project):
    """The project after prepare, train and evaluate: a model, learning curves and reports to protect."""
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY]).exit_code == 0
    assert runner.invoke(app, ["evaluate"]).exit_code == 0
    return project


@pytest.mark.parametrize("args", [
    ["train", "--batch-size", "100000"],
    ["train", "--seed", "-1"],
    ["train", "--depth", "0"],
    ["train", "--image-shape", "16", "16"],
    ["evaluate", "--output-dir", "missing"],
    ["prepare", "--data", "nowhere"],
    ["prepare", "--num-classes", "7"],
])
def test_a_failed_command_changes_nothing_the_user_had(runner, trained, args):
    before = {name: snapshot(trained / name) for name in ("output", "reports", "prepared")}
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    assert {name: snapshot(trained / name) for name in before} == before
    assert not [p.name for p in trained.rglob(".*") if p.name.endswith((".partial", ".tmp")) or ".old-" in p.name]


def test_an_unwritable_checkpoint_folder_is_found_before_any_training(runner, trained):
    """A path that cannot be a folder stands in for a read-only one (the tests may run as root)."""
    before = snapshot(trained / "reports"), snapshot(trained / "output")
    (trained / "checkpoints").rename(trained / "moved")
    (trained / "checkpoints").write_text("a file where the checkpoint folder goes")
    result = runner.invoke(app, ["train", *TINY])
    assert result.exit_code == 2 and result.output.startswith("error: cannot inspect checkpoints/output: Not a directory")
    assert "epoch 1" not in result.output
    assert (snapshot(trained / "reports"), snapshot(trained / "output")) == before


def test_evaluate_refuses_a_model_that_does_not_fit_the_prepared_data(runner, trained, tmp_path):
    before = snapshot(trained / "reports")
    make_image_folder(tmp_path / "other", {"x": 12, "y": 12, "z": 12}, size=(8, 8))
    assert runner.invoke(app, ["prepare", "--data", str(tmp_path / "other"), "--workers", "1"]).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2
    assert result.output.startswith("error: the model in output has other classes than prepared")
    assert runner.invoke(app, ["prepare", "--image-shape", "16", "16", "--workers", "1"]).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2 and "takes [8, 8] images but prepared holds [16, 16]" in result.output
    after = snapshot(trained / "reports")
    assert {k: v for (k, v) in after.items() if k != "data.json"} == {
        k: v for (k, v) in before.items() if k != "data.json"}  # prepare rewrote data.json; evaluate nothing


def test_evaluate_refuses_another_split_unless_told_and_reports_what_it_scored(runner, trained):
    """After `prepare --seed 1`, most of the 'test' images were training images: the score would flatter."""
    seed0 = json.loads((trained / "prepared" / "prepared.json").read_text())["data_hash"]
    record = json.loads((trained / "output" / "config.json").read_text())["trained_on"]
    assert record == {"prepared_data": seed0, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}
    assert json.loads((trained / "reports" / "metrics.json").read_text())["data"] == {
        "prepared": seed0, "matches_model": True}
    assert f"prepared data `{seed0[:12]}`: the data the model was trained on" in (
        trained / "reports" / "README.md").read_text()
    before = snapshot(trained / "reports")
    assert runner.invoke(app, ["prepare", "--seed", "1", "--workers", "1"]).exit_code == 0
    seed1 = json.loads((trained / "prepared" / "prepared.json").read_text())["data_hash"]
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: prepared is not the data the model in output was trained on (prepared: "
                                    f"data {seed1[:12]}, seed 1, val_fraction 0.1, test_fraction 0.2; the model: "
                                    f"data {seed0[:12]}, seed 0, val_fraction 0.1, test_fraction 0.2)")
    assert "run `mixer prepare --seed 0`, or pass --other-data to score it anyway" in result.output
    assert {k: v for (k, v) in snapshot(trained / "reports").items() if k != "data.json"} == {
        k: v for (k, v) in before.items() if k != "data.json"}
    result = runner.invoke(app, ["evaluate", "--other-data"])
    assert result.exit_code == 0 and "note: scoring prepared (data " in result.output, result.output
    assert json.loads((trained / "reports" / "metrics.json").read_text())["data"] == {
        "prepared": seed1, "matches_model": False}
    assert "**not** the data the model was trained on" in (trained / "reports" / "README.md").read_text()
    config = json.loads((trained / "output" / "config.json").read_text())
    del config["trained_on"]  # as imported weights and older models are
    (trained / "output" / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0 and "does not record the data it was trained on" in result.output, result.output
    assert json.loads((trained / "reports" / "metrics.json").read_text())["data"]["matches_model"] is None


def test_class_names_are_shown_as_written_in_figures(runner, project, tmp_path):
    data = make_image_folder(tmp_path / "odd", {"p$\\frac$": 12, "$x$": 12, "[b]c[/b]": 12}, size=(8, 8))
    write_params(project / "params.yaml", data=str(data), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3, num_steps=1)
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY]).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    assert (project / "reports" / "figures" / "confusion.png").stat().st_size > 1000


@pytest.mark.parametrize(("content", "message"), [
    ("depth: 3\ndepth: 4\n", "params.yaml, line 2, column 1: not valid YAML (key 'depth' is given twice (first "
                                 "on line 1))"),
    ("depth: [1, 2\n", "params.yaml, line 2, column 1: not valid YAML (expected ',' or ']', but got '<stream end>')"),
])
def test_params_file_mistakes_name_the_line(runner, project, content, message):
    (project / "params.yaml").write_text(content)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}"


def test_a_params_file_in_another_encoding_is_one_line(runner, project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text, encoding="utf-16")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and result.output.strip() == "error: params.yaml is not UTF-8 text; save it as UTF-8"


def test_import_weights_never_overwrites_by_surprise(runner, project):
    from safetensors.torch import save_file

    from reference import as_timm, random_weights

    save_file({k: v.contiguous() for (k, v) in as_timm(random_weights(3, (2, 2), 16, 8, 4, 16, 1, 3)).items()},
              str(project / "w.safetensors"))
    (project / "a_file").write_text("mine")
    (project / "photos").mkdir()
    (project / "photos" / "keep.jpg").write_bytes(b"mine")
    for (out, message) in (("a_file", "OUT_DIR a_file exists and is not a folder"),
                           ("photos", "OUT_DIR photos is a folder with files this command did not write (e.g. "
                                      "photos/keep.jpg)")):
        result = runner.invoke(app, ["import-weights", "w.safetensors", out, "--force"])
        assert result.exit_code == 2 and message in result.output
    assert (project / "a_file").read_text() == "mine" and (project / "photos" / "keep.jpg").read_bytes() == b"mine"
    assert runner.invoke(app, ["import-weights", "w.safetensors", "m"]).exit_code == 0
    result = runner.invoke(app, ["import-weights", "w.safetensors", "m"])
    assert result.exit_code == 2 and "already holds a model; pass --force" in result.output
    assert runner.invoke(app, ["import-weights", "w.safetensors", "m", "--force"]).exit_code == 0
    result = runner.invoke(app, ["import-weights", ".", "m2"])
    assert result.exit_code == 2 and "is a folder, not a weights file" in result.output


def _example(name):
    """A valid command-line value of key `name` (its params.yaml value), as option arguments."""
    value = yaml.safe_load((ROOT / "params.yaml").read_text())[name]
    if KEYS[name].kind is bool:
        return [f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}"]
    values = value if isinstance(value, list) else [value]
    return [f"--{name.replace('_', '-')}", *["null" if v is None else str(v) for v in values]]


WRONG_COMMAND = [(command, name) for command in STAGES for name in KEYS if name not in stage_keys(command)]


@pytest.mark.parametrize(("command", "name"), WRONG_COMMAND, ids=[f"{c}-{n}" for (c, n) in WRONG_COMMAND])
def test_a_key_given_to_a_command_that_does_not_read_it_names_the_one_that_does(runner, project, command, name):
    before = sorted(p.name for p in project.iterdir())
    result = runner.invoke(app, [command, *_example(name)])
    reader = next(s for s in STAGES if name in stage_keys(s))
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: --{name.replace('_', '-')} is read by `mixer {reader}`, not "
                                    f"`mixer {command}`")
    assert sorted(p.name for p in project.iterdir()) == before


@pytest.mark.parametrize("name", [n for n in KEYS if KEYS[n].nullable])
def test_every_nullable_key_takes_null_on_the_command_line(name):
    """`--checkpoint null`, `--num-classes null`: None for this run, whatever params.yaml says."""
    from pipeline import cli

    assert cli._nullable_value(name, "null") is None and cli._nullable_value(name, "None") is None
    kind = KEYS[name].base
    value = cli._nullable_value(name, "7")
    assert type(value) is kind and value == kind("7")  # the key's own type: 7 for an int key, "7" for text


def test_null_on_the_command_line_reaches_the_run(runner, project, monkeypatch):
    seen = {}
    monkeypatch.setattr("pipeline.check.run", lambda params, overrides: seen.update(overrides))
    result = runner.invoke(app, ["check", "--num-classes", "null", "--checkpoint", "null", "--token-hidden", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"num_classes": None, "checkpoint": None, "token_hidden": 3}
    result = runner.invoke(app, ["check", "--num-classes", "many"])
    assert result.exit_code == 2 and result.output == "error: --num-classes must be an integer or null, got 'many'\n"


def test_predict_outside_a_project_says_to_name_the_model(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", "img.jpg"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: no --model given and no params.yaml here") and "--model DIR" in result.output


@pytest.mark.parametrize("code", [0, 2])
def test_a_command_leaves_the_process_group_it_joined_before_the_process_exits(tmp_path, monkeypatch, code):
    """A gloo group alive at exit aborts the process now and then (exit -6): a launched run that succeeded
    would be reported failed. tests/test_multiprocess.py launches the real thing."""
    import torch.distributed as dist

    from pipeline import cli

    def command():  # what `mixer train` under torchrun does through accelerate, in one process
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise SystemExit(code)

    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code and not dist.is_initialized()
