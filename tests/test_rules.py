"""The rules of issue 29 across every command they concern: bounded error lines, one main process,
resources before work, provenance on every model, bench's model is train's, no run's checkpoint lost.

Each table is the rule's neighbours, not only the reported case: every command that reads params,
every launcher variable, every integer key.
"""

from __future__ import annotations

import json
import re
import typing

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ROOT, make_image_folder, make_project, only_run, write_params
from mixer.errors import MixerError
from mixer.launch import Processes, processes
from mixer.text import MAX_LINE, brief, one_line
from pipeline.cli import app
from pipeline.params import KEYS

TINY = ["--depth", "1", "--dim", "16", "--batch-size", "8", "--warmup-step", "0", "--no-progress"]
# every command that reads a params file, with what else it needs to get that far
PARAMS_READERS = [["check"], ["prepare", "--workers", "1"], ["train"], ["evaluate"], ["predict", "x.png"],
                  ["export"], ["bench", "--config", "default", "--steps", "1"]]


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, warmup_step=0))
    return tmp_path


def error_line(result) -> str:
    """The one line a failed command printed; fails the test unless there is exactly one, and no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output[:2000]
    return lines[0]


def alias_tree(levels: int) -> str:
    """`dataset:` as a YAML alias tree: a few hundred bytes that expand to 9**levels strings."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
                                                   for i in range(1, levels + 1)]
    return "[" + ", ".join(parts) + "]"


# ---- 1. an input problem is one bounded line, exit 2 --------------------------------------------

@pytest.mark.parametrize("command", PARAMS_READERS, ids=lambda c: c[0])
def test_an_alias_tree_in_params_is_one_short_line_for_every_command(runner, project, command):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(re.sub(r"(?m)^dataset: .*$", "dataset: " + alias_tree(6), text))
    line = error_line(runner.invoke(app, command))
    assert "dataset must be a non-empty string" in line and len(line) < 400


def test_a_nine_level_alias_tree_ends_at_once(runner, project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(re.sub(r"(?m)^dataset: .*$", "dataset: " + alias_tree(9), text))
    assert "dataset must be" in error_line(runner.invoke(app, ["check"]))


@pytest.mark.parametrize("value", [[[1] * 10**4] * 10**4, "x" * 10**6, {str(i): i for i in range(10**5)},
                                   10**5000, b"\x00" * 10**6], ids=["nested", "string", "dict", "integer", "bytes"])
def test_values_in_messages_are_bounded(value):
    assert len(brief(value)) < 200
    line = one_line(f"error: key must be a string, got {value!r}" if not isinstance(value, int) else "x" * 10**6)
    assert len(line) <= MAX_LINE and "\n" not in line


def test_a_long_unknown_key_is_named_briefly(runner, project):
    with open(project / "params.yaml", "a") as f:
        f.write("k" * 1000 + ": 1\n")  # YAML's longest simple key
    line = error_line(runner.invoke(app, ["check"]))
    assert "unknown key" in line and len(line) < 400


def integer_count(key) -> int:
    """How many integers the key's option takes: 1, 2 for a (height, width) pair, 0 for other keys."""
    if key.base is int:
        return 1
    args = typing.get_args(key.base) if typing.get_origin(key.base) is tuple else ()
    return len(args) if args and all(a is int for a in args) else 0


INTEGER_KEYS = [k.name for k in KEYS.values() if integer_count(k)]


@pytest.mark.parametrize("key", INTEGER_KEYS)
@pytest.mark.parametrize("value", [10**18, 10**18 + 1, 10**30, -10**30], ids=["1e18", "1e18+1", "1e30", "-1e30"])
def test_a_huge_integer_is_refused_by_check_for_every_integer_key(runner, project, key, value):
    """grad_accum and randaugment_n at 10**30 passed check, and train hung in one step."""
    given = [str(value)] * integer_count(KEYS[key])
    line = error_line(runner.invoke(app, ["check", f"--{key.replace('_', '-')}", *given]))
    # the key itself, or (an architecture key too big to train) the memory it would take
    assert re.search(rf"\b{key}(\[\d\])? (must be|is|-?\d+ with)", line) or "of memory to train" in line, line


@pytest.mark.parametrize(("key", "high"), [("grad_accum", 4096), ("randaugment_n", 16), ("num_steps", 100_000),
                                          ("warmup_step", 100_000)])
def test_bounded_keys_take_their_bound_and_refuse_one_more(key, high):
    from pipeline.params import load_params

    assert getattr(load_params(ROOT / "params.yaml", {key: high}), key) == high
    with pytest.raises(MixerError, match=f"{key} must be in"):
        load_params(ROOT / "params.yaml", {key: high + 1})


# ---- 4. one main process, decided in one place ---------------------------------------------------

LAUNCHED = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


@pytest.mark.parametrize(("env", "expected"), [
    ({}, Processes()),
    ({"RANK": "0"}, Processes()),
    ({"WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, Processes()),
    (LAUNCHED, Processes(1, 2, 2, 1)),
    ({**LAUNCHED, "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, Processes(0, 2, 1, 0)),
    # torchrun --nproc_per_node 1: a launcher's whole set, one process
    ({**LAUNCHED, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, Processes()),
])
def test_the_launchers_variables_give_the_process_its_place(env, expected):
    assert processes(env) == expected and processes(env).main == (expected.rank == 0)


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "1"}, "RANK=1 set, but WORLD_SIZE is not above 1: unset RANK"),
    ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0 set, but WORLD_SIZE is not above 1: unset LOCAL_RANK"),
    ({"RANK": "3", "LOCAL_RANK": "3"}, "RANK=3 and LOCAL_RANK=3 set"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but this process was not started by a launcher (no RANK, LOCAL_RANK, "
                          "MASTER_ADDR, MASTER_PORT)"),
    ({**LAUNCHED, "MASTER_PORT": ""}, "(no MASTER_PORT)"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer of at least 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer of at least 1"),
    ({**LAUNCHED, "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({**LAUNCHED, "RANK": "-1"}, "RANK='-1' must be an integer of at least 0"),
])
def test_a_stray_or_partial_launch_environment_is_one_line(env, message):
    with pytest.raises(MixerError) as caught:
        processes(env)
    assert message in str(caught.value)


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}])
def test_train_under_a_stray_launch_variable_stops_before_any_work(runner, project, monkeypatch, env):
    """RANK=1 mixer train printed nothing, wrote no model and exited 0; WORLD_SIZE=2 was Accelerate's traceback."""
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    for (name, value) in env.items():
        monkeypatch.setenv(name, value)
    line = error_line(runner.invoke(app, ["train", *TINY]))
    assert next(iter(env)) in line
    assert not (project / "output").exists() and not (project / "checkpoints").exists()


def test_a_params_error_is_printed_by_rank_0_only(runner, project, monkeypatch):
    for (name, value) in LAUNCHED.items():  # this process is rank 1 of 2: rank 0 says it
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["train", "--depth", "0"])
    assert result.exit_code == 2 and result.output == ""
    monkeypatch.setenv("RANK", "0")
    assert "depth must be at least 1" in error_line(runner.invoke(app, ["train", "--depth", "0"]))


# ---- 3. resources are checked before they are spent ----------------------------------------------

def test_check_refuses_a_validation_batch_that_cannot_fit(runner, project):
    """The training step fits; validation at eval_batch_size after epoch 1 would not."""
    line = error_line(runner.invoke(app, ["check", "--image-shape", "384", "384", "--patch-shape", "16", "16",
                                          "--batch-size", "8", "--eval-batch-size", "100000"]))
    assert "eval_batch_size 100000" in line and "to validate after each epoch" in line
    assert "lower eval_batch_size to at most" in line


def test_evaluate_refuses_an_eval_batch_that_cannot_fit(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY, "--num-steps", "1"]).exit_code == 0
    line = error_line(runner.invoke(app, ["evaluate", "--eval-batch-size", str(10**12)]))
    assert "eval_batch_size 1000000000000 at image_shape [8, 8] needs about" in line
    assert not (project / "reports" / "metrics.json").exists()


# ---- 5, 6, 7: provenance on every model, bench's model, every run's checkpoint kept ----------------

def test_best_records_the_data_and_weights_it_was_trained_from(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY, "--keep", "best"]).exit_code == 0
    delivered = json.loads((project / "output" / "config.json").read_text())
    best = json.loads((only_run(project / "checkpoints" / "output") / "best" / "config.json").read_text())
    assert best["trained_on"] == delivered["trained_on"] and best["trained_on"]["prepared_data"]
    # and what else decides the exact numbers: a second thread changes the matrix products' reduction order
    assert best["environment"] == delivered["environment"]
    assert (delivered["environment"]["threads"], delivered["environment"]["torch"]) == (torch.get_num_threads(),
                                                                                          torch.__version__)
    assert runner.invoke(app, ["import-weights", "output", "copy"]).exit_code == 0  # a copy is the same model
    copy = json.loads((project / "copy" / "config.json").read_text())
    assert (copy["trained_on"], copy["kept"]) == (delivered["trained_on"], delivered["kept"])
    # so evaluating the copy after a re-split is refused, as the model itself is, instead of a note
    assert runner.invoke(app, ["prepare", "--workers", "1", "--seed", "1"]).exit_code == 0
    assert "--other-data" in error_line(runner.invoke(app, ["evaluate", "--output-dir", "copy"]))
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    # fine-tuned from that model: both of the new run's models name the weights they started from
    assert runner.invoke(app, ["train", *TINY, "--checkpoint", "output", "--output-dir", "tuned"]).exit_code == 0
    tuned = json.loads((project / "tuned" / "config.json").read_text())
    best = json.loads((only_run(project / "checkpoints" / "tuned") / "best" / "config.json").read_text())
    assert best["source"] == tuned["source"] and best["source"]["fine_tuned_from"]["sha256"]
    assert best["trained_on"] == tuned["trained_on"]


def test_bench_measures_the_model_train_builds_from_a_checkpoint_at_another_size(runner, project):
    """With checkpoint: a model at 8×8 and image_shape 16×16, bench timed a fresh 16×16 model of params.yaml's
    architecture instead of the checkpoint's expanded one."""
    from pipeline.bench import configs

    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", "--depth", "2", "--dim", "24", "--batch-size", "8", "--warmup-step", "0",
                               "--no-progress", "--output-dir", "base"]).exit_code == 0
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.update(checkpoint="base", image_shape=[16, 16], depth=4, dim=16, output_dir="big")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", "--batch-size", "8", "--warmup-step", "0", "--num-steps", "1",
                               "--no-progress"]).exit_code == 0
    from mixer.checkpoint import load_model

    built = load_model(project / "big").config
    (benched, _) = configs("default", project / "params.yaml")["default"]
    assert (benched.depth, benched.dim, benched.image_shape) == (2, 24, (16, 16))
    assert benched.to_dict() == {**built.to_dict(), "num_classes": benched.num_classes}


def test_a_run_with_other_params_keeps_the_first_runs_checkpoint(runner, project):
    """`dvc exp run -S depth=8` after an interrupted default run overwrote its only state."""
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY]).exit_code == 0
    first = only_run(project / "checkpoints" / "output").relative_to(project)
    state = (first / "last.pt").read_bytes()
    other = runner.invoke(app, ["train", *TINY, "--depth", "2"])
    assert other.exit_code == 0 and "1 other run(s) stay in checkpoints/output" in other.output
    assert (first / "last.pt").read_bytes() == state
    again = runner.invoke(app, ["train", *TINY])
    assert f"{first / 'last.pt'} holds this run, complete: writing its model" in again.output
    assert json.loads((project / "output" / "config.json").read_text())["architecture"]["depth"] == 1


# ---- also confusing: one line instead of a silent surprise ---------------------------------------

def test_a_run_shorter_than_its_warm_up_is_said(runner, project):
    result = runner.invoke(app, ["check", "--num-steps", "2", "--warmup-step", "5"])
    assert result.exit_code == 0
    assert ("note: warmup_step 5 is not below num_steps 2: the run ends in its warm-up, at lr 0.0012 (of the peak "
            "0.003), and never decays") in result.output
    assert "warmup_step" not in runner.invoke(app, ["check", "--num-steps", "5", "--warmup-step", "4"]).output


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_a_cpu_is_refused_instead_of_running_fp32(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    line = error_line(runner.invoke(app, ["train", *TINY, "--mixed-precision", "fp16"]))
    assert "--mixed-precision fp16 needs a CUDA GPU" in line
    assert not (project / "output").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_a_params_error_under_a_launcher_is_one_line_from_rank_0(tmp_path, kind):
    """`torchrun ... mixer train --depth 0` printed the error once per rank."""
    import os
    import subprocess

    from conftest import HANG
    from test_multiprocess import launcher

    write_params(tmp_path / "params.yaml")
    run = subprocess.run(launcher(kind) + ["train", "--depth", "0"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=HANG, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in (run.stdout + run.stderr).splitlines() if "depth must be at least 1" in line]
    assert ours == ["error: params.yaml: depth must be at least 1, got 0"], run.stderr[-3000:]
    assert run.returncode != 0  # the launcher's own verdict on ranks that exited 2 (docs/training.md)


@pytest.mark.parametrize(("mode", "pixels", "grey"), [
    ("F", [[0.0, 0.5], [1.0, 0.25]], [[0, 128], [255, 64]]),       # [0, 1] floats: all black before
    ("F", [[0.0, 100.0], [255.0, 300.0]], [[0, 100], [255, 255]]),  # [0, 255] floats, clipped above
    ("F", [[float("nan"), 1.0], [0.0, 0.5]], [[0, 255], [0, 128]]),
    ("I;16", [[0, 65535], [32768, 0]], [[0, 255], [128, 0]]),
    ("L", [[0, 200], [17, 255]], [[0, 200], [17, 255]]),
], ids=["float01", "float255", "float-nan", "16bit", "grey"])
def test_every_grey_mode_decodes_to_its_brightness(tmp_path, mode, pixels, grey):
    from PIL import Image

    from mixer.decoding import decode

    array = np.array(pixels, dtype={"F": np.float32, "I;16": np.uint16, "L": np.uint8}[mode])
    Image.fromarray(array).save(tmp_path / "x.tif")  # PIL picks the mode from the dtype
    assert Image.open(tmp_path / "x.tif").mode == mode
    (rgb, _) = decode(tmp_path / "x.tif", (2, 2))
    assert rgb.shape == (2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[..., 0].tolist() == grey


def test_train_says_how_long_the_run_will_take_and_each_epoch_how_long_is_left(capsys):
    """A 20-minute run announced nothing but checkpoint lines; slow runs printed '0 img/s'."""
    from mixer.train_state import TrainState
    from pipeline.progress import ConsoleReporter

    now = [0.0]
    reporter = ConsoleReporter(bar=False, clock=lambda: now[0])
    state = TrainState({})
    reporter.start(state, epochs=4, steps_per_epoch=30)
    for step in range(1, 31):  # 3 s a step after the first
        now[0] += 3.0 if step > 1 else 40.0  # the first step's warm-up is not the rate
        state.step = step
        reporter.step(state)
    reporter.epoch({"epoch": 1, "train/loss": 1.0, "train/accuracy": 0.5, "val/loss": 1.0, "val/accuracy": 0.5,
                    "lr": 0.1, "images_per_second": 0.4})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("estimate: about 5.0 min to go, 1.5 min an epoch (measured on steps 2-21, training only: "
                        "validation adds to it)")
    assert lines[1].endswith("| 0.4 img/s | 4.5 min left")


def test_a_one_run_override_of_a_shared_key_is_checked_against_what_the_stage_reads(runner, project):
    """`mixer prepare --image_shape 16 16` was refused because params.yaml's patch_shape does not divide 16,
    and prepare takes no --patch_shape."""
    prepared = runner.invoke(app, ["prepare", "--workers", "1", "--image_shape", "9", "9"])
    assert prepared.exit_code == 0, prepared.output
    line = error_line(runner.invoke(app, ["train", *TINY, "--image_shape", "9", "9"]))
    assert line.endswith("image_shape [9, 9] is not divisible by patch_shape [2, 2]; patch_shape [3, 3] divides it")
    assert runner.invoke(app, ["train", *TINY, "--image_shape", "9", "9", "--patch_shape", "3", "3",
                               "--num-steps", "1"]).exit_code == 0
    assert "patch_shape" in error_line(runner.invoke(app, ["check", "--image_shape", "9", "9"]))


@pytest.mark.parametrize(("entries", "ours"), [
    ({"0123456789ab/": None, "fedcba987654/": None}, True),           # run folders
    ({"last.pt": b"", "best/": None, "0123456789ab/": None}, True),     # the layout before run folders, beside them
    ({".last.pt.x1.tmp": b""}, True),                                  # a killed write's leftover
    ({"0123456789ab": b"a file"}, False),                               # a run folder's name, but a file
    ({"0123456789ab/": None, "notes.txt": b"mine"}, False),              # the user's file
    ({"0123456789AB/": None}, False),                                   # not a key: keys are lower-case hex
    ({"0123456789abc/": None}, False),                                  # 13 characters
])
def test_the_run_checkpoint_folder_is_ours_only_with_our_entries(tmp_path, entries, ours):
    from pipeline.outputs import RUN

    for (name, content) in entries.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    assert (RUN.owns(tmp_path) is None) == ours


def test_keep_best_on_a_small_val_split_is_said_to_be_noise(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    said = runner.invoke(app, ["train", *TINY, "--num-steps", "1", "--keep", "best"]).output
    assert "note: keep: best picks an epoch by 3 val images, where one image is 33.33 points of accuracy" in said
    assert "keep: best picks" not in runner.invoke(app, ["train", *TINY, "--num-steps", "1"]).output


# ---- the neighbours a hostile pass found ---------------------------------------------------------

LONG = "x" * 300  # one path part over the 255 bytes a file name may have


@pytest.mark.parametrize("args", [
    ["check", "--lr", "7" * 400],                       # a float key given an integer no float holds
    ["check", "--crop-scale", "0.5", "9" * 400],
    ["check", "--dataset", "dig\0its"],                 # a NUL byte, for every command that reads the key
    ["train", *TINY, "--dataset", "dig\0its"],
    ["check", "--checkpoint", LONG],                    # a path part too long: OSError, not a traceback
    ["predict", "images", "--model", LONG],
    ["import-weights", LONG, "q"],
    ["predict", LONG],
    ["evaluate", "--output-dir", LONG],
], ids=["float-int", "float-list-int", "nul-check", "nul-train", "long-checkpoint", "long-model", "long-import",
        "long-predict", "long-output-dir"])
def test_hostile_values_are_one_line(runner, project, args):
    line = error_line(runner.invoke(app, args))
    assert len(line) < 400


@pytest.mark.parametrize("nesting", ["[" * 3000 + "]" * 3000, "{a: " * 3000 + "1" + "}" * 3000])
def test_yaml_nested_thousands_deep_is_one_line(runner, project, nesting):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(re.sub(r"(?m)^dataset: .*$", "dataset: " + nesting, text))
    assert "nested too deeply" in error_line(runner.invoke(app, ["check"]))


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"])
def test_a_launcher_variable_set_but_empty_is_one_line(name):
    with pytest.raises(MixerError, match=f"environment variable {name} is set but empty"):
        processes({name: ""})


def test_class_folders_alike_but_for_an_invisible_character_are_refused(tmp_path):
    from mixer.sources import scan_folder

    make_image_folder(tmp_path / "d", {"cat": 2, "ca\u200bt": 2, "dog": 2})
    with pytest.raises(MixerError, match="differ only by letter case or Unicode form or invisible characters"):
        scan_folder(tmp_path / "d")


def test_finders_ds_store_in_the_checkpoint_folder_is_not_a_foreign_file(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    (project / "checkpoints" / "output").mkdir(parents=True)
    (project / "checkpoints" / "output" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert runner.invoke(app, ["train", *TINY, "--num-steps", "1"]).exit_code == 0
    (project / "checkpoints" / "output" / "notes.txt").write_text("mine")
    line = error_line(runner.invoke(app, ["train", *TINY, "--num-steps", "1"]))
    assert "(e.g. checkpoints/output/notes.txt)" in line


def test_a_float_image_with_a_stray_pixel_keeps_its_brightness(tmp_path):
    from PIL import Image

    from mixer.decoding import decode

    pixels = np.full((4, 4), 0.5, dtype=np.float32)
    pixels[0, 0], pixels[0, 1], pixels[0, 2] = 1.0001, np.nan, np.inf  # one hot pixel, a NaN, an inf
    Image.fromarray(pixels).save(tmp_path / "f.tif")
    (rgb, _) = decode(tmp_path / "f.tif", (4, 4))
    assert rgb[1:, :, 0].tolist() == [[128] * 4] * 3 and rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 0
