"""params.yaml loading: every validation rule names its key; the files in the repo stay valid."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_params
from mixer.errors import MixerError
from pipeline.params import CONFIGS, DECLARATIONS_ONLY, KEYS, Params, input_shape, load_params, stage_keys, synced

ORIGINAL_FLAGS = ["image_shape", "patch_shape", "depth", "dim", "num_classes", "checkpoint", "output_dir",
                  "batch_size", "lr", "momentum", "decay", "num_steps", "warmup_step", "scheduler"]


def test_committed_params_load_and_the_files_derived_from_the_declarations_are_in_step():
    load_params(ROOT / "params.yaml")
    stale = [path.name for (path, text) in synced(ROOT).items() if path.read_text(encoding="utf-8") != text]
    assert not stale, f"{stale}: run python -m pipeline.params --sync"


def test_the_14_original_options_are_top_level_keys():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(ORIGINAL_FLAGS) <= set(raw)


def test_original_preset_holds_the_original_defaults():
    p = load_params(ROOT / "presets" / "original.yaml")
    assert (p.image_shape, p.patch_shape, p.depth, p.dim, p.num_classes) == ((256, 256), (16, 16), 6, 512, 120)
    assert (p.checkpoint, p.output_dir, p.batch_size, p.lr, p.momentum, p.decay) == (None, "output/", 16, 1e-3, 0.9, 0.0)
    assert (p.num_steps, p.warmup_step, p.scheduler, p.optimizer) == (30, 10, "cosine", "sgd")


def test_finetune_preset_holds_the_papers_fine_tuning_recipe():
    p = load_params(ROOT / "presets" / "finetune.yaml")
    assert p.checkpoint == "hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k"
    assert (p.optimizer, p.momentum, p.scheduler, p.clip_grad, p.decay) == ("sgd", 0.9, "cosine", 1.0, 0.0)
    assert p.warmup_step > 0 and p.num_classes is None
    assert yaml.safe_load((ROOT / "presets" / "finetune.yaml").read_text()).keys() == \
        yaml.safe_load((ROOT / "params.yaml").read_text()).keys()


@pytest.mark.parametrize("stage", ["check", "prepare", "train", "evaluate"])
def test_dvc_yaml_lists_exactly_the_params_each_stage_reads(stage):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["stages"][stage]["params"] == stage_keys(stage)


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate"])
def test_every_stage_waits_for_the_params_check(stage):
    """DVC orders stages by their files: the check's output must be a dependency of every other stage."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    check = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["check"]["outs"]]
    assert check == ["reports/params-check.txt"] and "reports/params-check.txt" in dvc["stages"][stage]["deps"]


NOT_DEPS = DECLARATIONS_ONLY  # imported by a stage, but its outputs cannot depend on them


@pytest.mark.parametrize("stage", ["check", "prepare", "train", "evaluate"])
def test_dvc_yaml_lists_the_code_each_stage_imports(stage):
    """A change to any module a stage runs re-runs that stage (dvc repro would be stale otherwise)."""
    script = (f"import sys, pipeline.{stage}; print('\\n'.join(m.__file__ for (n, m) in sys.modules.items() "
              "if n.split('.')[0] in ('mixer', 'pipeline') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    imported = {Path(f).resolve().relative_to(ROOT).as_posix() for f in out.splitlines()}
    imported = {f for f in imported if not f.endswith("__init__.py")}
    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    assert f"pipeline/{stage}.py" in imported
    missing = imported - NOT_DEPS.get(stage, set()) - deps
    assert not missing, sorted(missing)


BAD = [
    ({"lr": "1e-3"}, "lr: YAML reads '1e-3' as a string; write it with a decimal point"),
    ({"lr": 0.0}, "lr must be positive, got 0.0"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"depth": 0}, "depth must be at least 1, got 0"),
    ({"depth": 2.5}, "depth must be an integer, got 2.5"),
    ({"depth": True}, "depth must be an integer, got True"),
    ({"dim": -3}, "dim must be at least 1, got -3"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be at least 1, got 0"),
    ({"num_steps": 0}, "num_steps must be in 1..100000, got 0"),
    ({"grad_accum": 0}, "grad_accum must be in 1..4096, got 0"),
    ({"num_classes": 1}, "num_classes must be at least 2 or null, got 1"),
    ({"image_shape": [256, 250]}, "image_shape [256, 250] is not divisible by patch_shape [3, 3]; patch_shape [4, 2] divides it"),
    ({"image_shape": [16]}, "image_shape must be a list of 2 numbers, got [16]"),
    ({"image_shape": "256"}, "image_shape must be a list of 2 numbers, got '256'"),
    ({"image_shape": [0, 12]}, "image_shape must be values each in 1..65536, got [0, 12]"),
    ({"patch_shape": [0, 3]}, "patch_shape must be values each in 1..65536, got [0, 3]"),
    ({"scheduler": "step"}, "scheduler must be 'cosine' or 'linear', got 'step'"),
    ({"optimizer": "adam"}, "optimizer must be 'sgd' or 'adamw', got 'adam'"),
    ({"resize": "pad"}, "resize must be 'stretch' or 'center_crop', got 'pad'"),
    ({"variant": "XL/8"}, "variant must be 'S/32' or 'S/16' or 'B/32' or 'B/16' or 'L/32' or 'L/16' or 'H/14' or null, got 'XL/8'"),
    ({"warmup_step": -1}, "warmup_step must be in 0..100000, got -1"),
    ({"min_lr": 1.0}, "min_lr must be between 0 and lr (0.003), got 1.0"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    ({"decay": -0.1}, "decay must be 0 or more, got -0.1"),
    ({"clip_grad": -1.0}, "clip_grad must be 0 or more, got -1.0"),
    ({"mixup": -0.2}, "mixup must be 0 or more, got -0.2"),
    ({"cutmix": -1}, "cutmix must be 0 or more, got -1.0"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1), got 1.0"),
    ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
    ({"drop_path": -0.1}, "drop_path must be in [0, 1), got -0.1"),
    ({"ema_decay": 1.0}, "ema_decay must be in [0, 1), got 1.0"),
    ({"hflip": 2.0}, "hflip must be in [0, 1], got 2.0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction must leave a training share"),
    ({"crop_scale": [0.9, 0.5]}, "crop_scale must be a pair with 0 < low <= high <= 1, got [0.9, 0.5]"),
    ({"crop_ratio": [0.0, 1.0]}, "crop_ratio must be a pair with 0 < low <= high, got [0.0, 1.0]"),
    ({"randaugment_n": -1}, "randaugment_n must be in 0..16, got -1"),
    ({"randaugment_m": 31}, "randaugment_m must be in 0..30, got 31"),
    ({"strict": "yes"}, "strict must be true or false, got 'yes'"),
    ({"dataset": ""}, "dataset must be a non-empty string, got ''"),
    ({"token_hidden": 0}, "token_hidden must be at least 1 or null"),
    ({"seed": -1}, "seed must be in 0 .. 2**32 - 1, got -1"),
    ({"seed": 2**32}, "seed must be in 0 .. 2**32 - 1, got 4294967296"),
    # each rule's other edge, and the parts of a message a broken rule would lose
    ({"image_shape": [9, 8]}, "image_shape [9, 8] is not divisible by patch_shape [3, 3]; patch_shape [3, 4] divides it"),
    ({"image_shape": [12, "x"]}, "image_shape[1] must be an integer, got 'x'"),
    ({"lr": "1E-3"}, "lr: YAML reads '1E-3' as a string; write it with a decimal point, e.g. 1.0e-03"),
    ({"freeze": "all"}, "freeze must be 'none' or 'features', got 'all'"),
    ({"freeze": "features"}, "freeze: features trains only the head, so it needs a checkpoint to take the features "
                             "from"),
    ({"val_fraction": 0.0}, "val_fraction must be in (0, 1), got 0.0"),
    ({"test_fraction": 0.0}, "test_fraction must be in (0, 1), got 0.0"),
    ({"crop_scale": [0.0, 0.5]}, "crop_scale must be a pair with 0 < low <= high <= 1, got [0.0, 0.5]"),
    ({"crop_scale": [0.5, 1.5]}, "crop_scale must be a pair with 0 < low <= high <= 1, got [0.5, 1.5]"),
]

# The accepted edge of each rule above: a rule made stricter by one (> for >=, 2 for 1) refuses it.
EDGES = [
    {"num_classes": 2},
    {"token_hidden": 1, "channel_hidden": 1},
    {"image_shape": [1, 3], "patch_shape": [1, 3]},
    {"image_shape": [9, 8], "patch_shape": [3, 2]},  # each side by its own patch side
    {"warmup_step": 0},
    {"scheduler": "linear"},
    {"freeze": "features", "checkpoint": "models/some-run"},
    {"seed": 2**32 - 1},
    {"min_lr": 3.0e-3},  # equal to lr
    {"momentum": 0.0},
    {"crop_scale": [0.5, 0.5]},
    {"crop_ratio": [1.0, 1.0]},
    {"randaugment_m": 0},
    {"randaugment_m": 30},
    {"hflip": 1.0},
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[next(iter(c)) + str(i) for (i, (c, _)) in enumerate(BAD)])
def test_each_bad_value_is_one_line_naming_the_key(tmp_path, change, message):
    path = write_params(tmp_path / "params.yaml", **change)
    with pytest.raises(MixerError) as caught:
        load_params(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


@pytest.mark.parametrize("change", EDGES, ids=lambda c: "-".join(c))
def test_each_rule_accepts_its_edge(tmp_path, change):
    p = load_params(write_params(tmp_path / "p.yaml", **change))
    assert {k: getattr(p, k) for k in change} == {k: tuple(v) if isinstance(v, list) else v
                                                  for (k, v) in change.items()}


def test_unknown_and_missing_keys_are_all_named(tmp_path):
    def error(path: Path) -> str:
        with pytest.raises(MixerError) as caught:
            load_params(path)
        return str(caught.value)

    path = write_params(tmp_path / "p.yaml", dept=3)
    assert error(path) == f"{path}: unknown key 'dept'"
    path = write_params(tmp_path / "p.yaml", dept=3, aa=0)
    assert error(path) == f"{path}: unknown key 'aa' (and ['dept'])"
    path = write_params(tmp_path / "p.yaml", dept=3, lr_=1, aa=0)
    assert error(path) == f"{path}: unknown key 'aa' (and ['dept', 'lr_'])"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["seed"]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(raw))
    assert error(tmp_path / "q.yaml") == f"{tmp_path / 'q.yaml'}: missing key 'seed'"
    del raw["lr"]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(raw))
    assert error(tmp_path / "q.yaml") == f"{tmp_path / 'q.yaml'}: missing key 'lr' (and ['seed'])"


def test_unreadable_file_and_yaml_errors_without_a_position(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MixerError) as caught:
        load_params(tmp_path / "file" / "params.yaml")
    assert str(caught.value) == f"cannot read {tmp_path / 'file' / 'params.yaml'}: Not a directory"
    (tmp_path / "nul.yaml").write_text("seed: 0\x00\n")  # the reader's error has no line and column
    with pytest.raises(MixerError) as caught:
        load_params(tmp_path / "nul.yaml")
    assert str(caught.value) == (f"{tmp_path / 'nul.yaml'}: not valid YAML (unacceptable character #x0000: "
                                 "special characters are not allowed)")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MixerError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: 0\ndepth: [1, 2\n")
    with pytest.raises(MixerError, match="bad.yaml, line 3, column 1: not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("seed: 0\nlr: 1.0e-3\nseed: 1\n")
    with pytest.raises(MixerError, match="line 3, column 1: not valid YAML \\(key 'seed' is given twice \\(first on "
                                         "line 1\\)\\)"):
        load_params(tmp_path / "twice.yaml")
    (tmp_path / "nested.yaml").write_text("image_shape: {a: 1, a: 2}\n")
    with pytest.raises(MixerError, match="key 'a' is given twice"):
        load_params(tmp_path / "nested.yaml")
    (tmp_path / "keys.yaml").write_text("1: a\nx: b\n")
    with pytest.raises(MixerError, match="unknown key '1'"):
        load_params(tmp_path / "keys.yaml")
    with pytest.raises(MixerError, match="is a folder; give a params file"):
        load_params(tmp_path)
    (tmp_path / "utf16.yaml").write_text("seed: 0\n", encoding="utf-16")
    with pytest.raises(MixerError, match="is not UTF-8 text; save it as UTF-8"):
        load_params(tmp_path / "utf16.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MixerError, match="must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_overrides_apply_for_one_run_and_are_validated(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    before = path.read_text()
    p = load_params(path, {"depth": 8, "image_shape": (24, 24)})
    assert (p.depth, p.image_shape) == (8, (24, 24))
    assert path.read_text() == before
    with pytest.raises(MixerError, match="depth must be at least 1"):
        load_params(path, {"depth": 0})


def test_variant_takes_its_own_patch_for_divisibility(tmp_path):
    p = load_params(write_params(tmp_path / "p.yaml", variant="S/16", image_shape=[224, 224], patch_shape=[3, 3]))
    assert p.variant == "S/16"


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Params().depth = 3


def test_for_stage_gives_exactly_the_stage_keys_with_their_values(tmp_path):
    p = load_params(write_params(tmp_path / "p.yaml", depth=7))
    train = p.for_stage("train")
    assert list(train) == [k for k in stage_keys("train")]
    assert train["depth"] == 7 and train["image_shape"] == p.image_shape
    assert "val_fraction" not in train and "val_fraction" in p.for_stage("prepare")


@pytest.mark.parametrize(("shape", "fits"), [
    ((24, 36), True), ((48, 72), True), ((72, 108), True), ((24, 72), True), ((48, 36), True),  # own, K×, per side
    ((12, 12), False), ((12, 18), False), ((36, 54), False), ((25, 36), False), ((24, 48), False),
    ((240, 35), False), ((1, 1), False),
])
def test_with_a_checkpoint_image_shape_is_its_own_or_a_whole_multiple_per_side(tmp_path, capsys, shape, fits):
    from mixer.model import MixerConfig

    p = load_params(write_params(tmp_path / "p.yaml"))
    assert input_shape(p) == (12, 12)
    tuned = dataclasses.replace(p, checkpoint="models/b16", image_shape=shape)
    config = MixerConfig(image_shape=(24, 36), patch_shape=(12, 12), depth=1, dim=8, num_classes=3)
    if fits:
        assert input_shape(tuned, config) == shape
    else:
        with pytest.raises(MixerError) as error:
            input_shape(tuned, config)
        assert str(error.value) == (
            f"checkpoint models/b16: image_shape {list(shape)} does not fit weights whose token mixing is tied to "
            "a 2x3 grid of 12x12 patches: give their own [24, 36] or a whole multiple per side, e.g. [48, 72] "
            "(fine-tuning at a higher resolution)")
    assert capsys.readouterr().out == ""


def test_input_shape_reads_a_checkpoint_it_is_not_given(tmp_path):
    from mixer import create_model
    from mixer.checkpoint import save_model

    save_model(create_model(image_shape=(8, 16), patch_shape=(4, 4), depth=1, dim=8, num_classes=2), tmp_path / "m")
    p = dataclasses.replace(load_params(write_params(tmp_path / "p.yaml")), checkpoint=str(tmp_path / "m"))
    with pytest.raises(MixerError, match=r"tied to a 2x4 grid of 4x4 patches: give their own \[8, 16\]"):
        input_shape(p)
    assert input_shape(dataclasses.replace(p, image_shape=(16, 32))) == (16, 32)


def test_a_key_is_declared_once_on_the_config_that_uses_it():
    depth = KEYS["depth"]
    assert (depth.owner.__name__, depth.declaration.help, depth.declaration.stages) == ("MixerConfig", "number of Mixer blocks", ("train",))
    assert depth.declaration.original == 6
    assert (KEYS["num_steps"].owner.__name__, KEYS["num_steps"].attribute) == ("TrainConfig", "epochs")
    assert KEYS["val_fraction"].declaration.stages == ("prepare",)
    assert set(KEYS) == set(yaml.safe_load((ROOT / "params.yaml").read_text()))


LIBRARY_BAD = [(change, message) for (change, message) in BAD if len(change) == 1
               and next(iter(change)) in KEYS and KEYS[next(iter(change))].owner is not CONFIGS[0]
               and "YAML" not in message and "divisible" not in message and "checkpoint" not in message]


@pytest.mark.parametrize(("change", "message"), LIBRARY_BAD, ids=[next(iter(c)) for (c, _) in LIBRARY_BAD])
def test_the_library_config_refuses_what_params_yaml_refuses_with_the_same_words(change, message):
    """One home for each rule: the config that uses a key checks it, whoever builds the config."""
    (name, value), = change.items()
    key = KEYS[name]
    required = {"image_shape": (12, 12)} if key.owner.__name__ == "PrepareConfig" else {}
    with pytest.raises(MixerError) as caught:
        key.owner(**required, **{key.attribute: value})
    assert message in str(caught.value)


def test_a_new_key_needs_its_declaration_its_use_and_params_yaml(tmp_path):
    """In a copy of the project, add a key to TrainConfig and params.yaml: everything else follows."""
    import shutil

    for name in ("mixer", "pipeline", "presets"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    engine = tmp_path / "mixer" / "engine.py"
    anchor = "    augment: AugmentConfig = field(default_factory=AugmentConfig)\n"
    assert anchor in engine.read_text()
    engine.write_text(engine.read_text().replace(anchor, '    loss_gain: float = hp(1.0, "scales the loss", '
                                                         'rule=positive())\n' + anchor))
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text() + "loss_gain: 1.0\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}

    def python(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    assert python("-m", "pipeline.params", "--check").returncode == 1
    assert python("-m", "pipeline.params", "--sync").returncode == 0
    assert python("-m", "pipeline.params", "--check").returncode == 0
    dvc = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    assert "loss_gain" in dvc["stages"]["train"]["params"] and "loss_gain" not in dvc["stages"]["prepare"]["params"]
    for preset in (tmp_path / "presets").glob("*.yaml"):
        assert yaml.safe_load(preset.read_text())["loss_gain"] == 1.0
    assert "`loss_gain`" in (tmp_path / "README.md").read_text()
    script = ("from pipeline.params import load_params, fingerprint_keys; from pipeline.train import train_config\n"
              "p = load_params(overrides={'loss_gain': 2.5}); assert train_config(p).loss_gain == 2.5\n"
              "assert 'loss_gain' in fingerprint_keys()\n"
              "try: load_params(overrides={'loss_gain': 0})\n"
              "except Exception as e: print(e)")
    run = python("-c", script)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "params.yaml: loss_gain must be positive, got 0.0"
    helptext = python("-c", "from pipeline.cli import app; app()", "train", "--help")
    assert "--loss-gain" in helptext.stdout and "--loss_gain" in helptext.stdout and "scales the loss" in helptext.stdout
