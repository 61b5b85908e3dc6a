"""params.yaml → one frozen, validated `Params`; the only place that reads the file.

Each key is declared once, on the library config that uses it (`mixer.hparams.hp`): MixerConfig,
TrainConfig, AugmentConfig, PrepareConfig, and `Project` below for the keys the pipeline itself
interprets. `Params` is derived from those declarations, flat, as params.yaml is, so
`dvc exp run -S depth=8` names a key as written. So are the CLI's options (pipeline/cli.py), the
README's table and dvc.yaml's per-stage lists (`python -m pipeline.params --sync` writes them; a test
keeps them in step). Loading checks everything up front; a bad value raises `MixerError` naming the
key, which the CLI prints as one line with exit code 2 before any work is done.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixer import hparams
from mixer.augment import AugmentConfig
from mixer.data import PrepareConfig
from mixer.engine import TrainConfig
from mixer.errors import MixerError
from mixer.hparams import Key, hp, one_of
from mixer.model import VARIANTS, MixerConfig, grid_multiple
from mixer.pretrained import pretrained_config
from mixer.text import brief, shown

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class Project:
    """The keys the pipeline itself interprets: where data and weights come from and go to."""

    dataset: str = hp("digits", "the images: 'digits' (embedded), an image folder (one sub-folder per class), a "
                      "CSV, or a .zip/.tar archive of a folder", stages="prepare")
    checkpoint: str | None = hp(None, "weights to fine-tune: a model directory, a weights file, "
                                "hf-hub:owner/name[@revision] or an https:// URL; image_shape is its input size or a "
                                "whole multiple per side (token mixing expanded)", stages="prepare train")
    output_dir: str = hp("output", "where the trained model is written", stages="train evaluate",
                         affects=False, original="output/")
    variant: str | None = hp(None, f"paper variant ({' '.join(VARIANTS)}): sets patch_shape, depth, dim and the "
                             "hidden widths; token_hidden/channel_hidden still apply", rule=one_of(*VARIANTS))


CONFIGS = (Project, PrepareConfig, MixerConfig, TrainConfig, AugmentConfig)


def _declared() -> dict[str, Key]:
    found: dict[str, Key] = {}
    for config in CONFIGS:
        for key in hparams.keys(config):
            if key.name in found:
                raise TypeError(f"{key.name} is declared twice: {found[key.name].owner.__name__}, {config.__name__}")
            found[key.name] = key
    return found


KEYS: dict[str, Key] = _declared()
RENAMED = {"data": "dataset"}  # old key → new: still read, with a note
STAGES = ("prepare", "train", "evaluate")


def _post_init(self) -> None:
    for key in KEYS.values():
        object.__setattr__(self, key.name, hparams.validate(key, getattr(self, key.name)))
    values = dataclasses.asdict(self)
    # each config's checks across its fields (min_lr <= lr, the split's shares, crop ranges)
    hparams.build(PrepareConfig, values)
    hparams.build(TrainConfig, values)
    if self.freeze != "none" and self.checkpoint is None:
        raise MixerError("freeze: features trains only the head, so it needs a checkpoint to take the features from")


def _for_stage(self, stage: str) -> dict:
    """The params a stage reads, as plain values."""
    return {k: getattr(self, k) for k in stage_keys(stage) if stage != "check"}


Params = dataclasses.make_dataclass(
    "Params", [(k.name, k.kind, dataclasses.field(default=k.default)) for k in KEYS.values()], frozen=True,
    namespace={"__post_init__": _post_init, "for_stage": _for_stage, "__module__": __name__,
               "__doc__": "Every params.yaml key, validated (derived from the declarations: see the module)."})


def notes(p: Params) -> list[str]:
    """Choices that are valid but rarely meant, said in one line each by `check` and `train`."""
    out = []
    if p.warmup_step >= p.num_steps:
        out.append(f"note: warmup_step {p.warmup_step} is not below num_steps {p.num_steps}: the run ends in its "
                   f"warm-up, at lr {p.lr * p.num_steps / p.warmup_step:.3g} (of the peak {p.lr:g}), and never decays; "
                   "lower warmup_step to train with the schedule")
    return out


def stage_keys(stage: str) -> list[str]:
    """Names of the params a stage reads (what dvc.yaml lists for it); `check` reads them all."""
    return [k.name for k in KEYS.values() if stage in k.declaration.stages or stage == "check"]


def fingerprint_keys() -> list[str]:
    """The train params a resume compares: those that decide a run's result, less those declared not to
    stop a continuation (batch_size: the engine compares the global batch; keep: both models are kept)."""
    return [k.name for k in KEYS.values() if "train" in k.declaration.stages and k.declaration.affects
            and k.declaration.fingerprint]


def build(config: type, p, **given):
    """A library config from the params (`mixer.hparams.build`)."""
    return hparams.build(config, dataclasses.asdict(p), **given)


def input_shape(p: Params, checkpoint_config: MixerConfig | None = None) -> tuple[int, int]:
    """The images' size, `image_shape`, checked against the checkpoint's when fine-tuning: its own size or
    a whole multiple of it per side (the token-mixing weights are tied to its patch grid; `train` expands
    them to a multiple). `checkpoint_config`: the checkpoint's architecture when the caller has already
    loaded it."""
    if p.checkpoint is not None:
        try:
            grid_multiple(checkpoint_config or pretrained_config(p.checkpoint), p.image_shape)
        except MixerError as exc:
            raise MixerError(f"checkpoint {shown(p.checkpoint)}: {exc}") from None
    return p.image_shape


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for (key_node, _) in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {brief(key)} is given twice (first on line {first[key]})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class says so
                pass
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> object:
    """A YAML file's content; a one-line error naming the file (and line) when it cannot be had."""
    if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or a device would block or never end
        raise MixerError(f"{path} is not a regular file; give a params file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise MixerError(f"params file {path} does not exist") from None
    except IsADirectoryError:
        raise MixerError(f"{path} is a folder; give a params file") from None
    except OSError as exc:
        raise MixerError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise MixerError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except RecursionError:  # YAML nested thousands of levels deep: the parser recurses once per level
        raise MixerError(f"{path}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MixerError(f"{path}{where}: not valid YAML ({problem})") from None


def check_architecture(p: Params) -> None:
    """The architecture's checks across keys (patch_shape divides image_shape), when the params give it."""
    if p.variant is None and p.checkpoint is None:  # else the architecture comes from them
        hparams.build(MixerConfig, dataclasses.asdict(p), num_classes=2)


def load_params(path: Path = PARAMS_FILE, overrides: dict | None = None, stage: str | None = None) -> Params:
    """Read and validate a params file; `overrides` (key → value) win for this run only. `stage`: the stage
    whose run this is; a stage that reads no architecture key (prepare, evaluate) is not stopped by a
    one-run override of a key it shares with train (`mixer prepare --image_shape 16 16` with params.yaml's
    patch_shape [3, 3]); train and every other caller check it all."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise MixerError(f"{path} must be a mapping of keys to values")
    for (old, new) in RENAMED.items():
        if old in raw and new not in raw:
            print(f"note: {path}: key {old!r} is now called {new!r} (it named the same thing as DVC's data/ "
                  f"folder in `dvc exp show`); rename it", file=sys.stderr)
            raw[new] = raw.pop(old)
    known = set(KEYS)
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        raise MixerError(f"{path}: unknown key {brief(unknown[0])}" + (f" (and {brief(unknown[1:])})" if unknown[1:] else ""))
    missing = sorted(known - set(raw))
    if missing:
        raise MixerError(f"{path}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
    raw.update(overrides or {})
    try:
        p = Params(**raw)
        if stage in (None, "train"):  # prepare and evaluate read no patch_shape: see `check_architecture`
            check_architecture(p)
        return p
    except MixerError as exc:
        raise MixerError(f"{path}: {exc}") from None


# ---- what is derived from the declarations and kept in files: `python -m pipeline.params --sync` ----

TABLE_START, TABLE_END = "<!-- params-table:start -->", "<!-- params-table:end -->"


def _yaml_value(value) -> str:
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=1000).strip().removesuffix("...").strip()


def markdown_table(values: dict) -> str:
    """The README's table of keys: stages, the value in `values` (params.yaml's), the original's, accepted."""
    rows = ["| key | stages | params.yaml | original train.py | meaning (accepted) |", "| --- | --- | --- | --- | --- |"]
    for key in KEYS.values():
        d = key.declaration
        accepted = ([d.rule.text] if d.rule is not None else []) + (["null"] if key.nullable else [])
        original = f"`{_yaml_value(d.original)}`" if d.original is not None else ""
        meaning = d.help.replace("|", "\\|") + (f" ({', '.join(accepted)})" if accepted else "")
        rows.append(f"| `{key.name}` | {' '.join(d.stages)} | `{_yaml_value(values.get(key.name))}` | {original} | "
                    f"{meaning} |")
    return "\n".join(rows)


# Modules a stage imports only because params.yaml is validated whole, with each key's declaration on
# the config that uses it: the stage's outputs cannot depend on them, and listing them would re-run
# prepare whenever the training loop changes. `check`, the first stage, depends on them all.
DECLARATIONS_ONLY = {
    "prepare": {"mixer/augment.py", "mixer/engine.py", "mixer/evaluation.py", "mixer/optim.py", "mixer/probe.py",
                "mixer/schedule.py"},
    "evaluate": {"mixer/augment.py", "mixer/engine.py", "mixer/optim.py", "mixer/probe.py", "mixer/schedule.py"},
}


def stage_code(root: Path, stage: str) -> list[str]:
    """The project's modules `pipeline.<stage>` runs (dvc.yaml's code deps for it), found by importing it."""
    script = (f"import sys, pipeline.{stage}; print('\\n'.join(m.__file__ for (n, m) in sys.modules.items() "
              "if n.split('.')[0] in ('mixer', 'pipeline') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True).stdout
    files = {Path(f).resolve().relative_to(root.resolve()).as_posix() for f in out.splitlines()}
    return sorted(f for f in files if not f.endswith("__init__.py") and f not in DECLARATIONS_ONLY.get(stage, ()))


def _dvc_list(text: str, stage: str, name: str, entries) -> str:
    """dvc.yaml's text with `stage`'s `name:` list made by `entries(old list)` (the rest, comments included, as is)."""
    pattern = re.compile(rf"(^  {re.escape(stage)}:\n(?:(?!  \S).*\n|\n)*?    {name}:\n)((?:      - .*\n)+)", re.M)
    match = pattern.search(text)
    if match is None:
        raise MixerError(f"dvc.yaml: stage {stage} has no {name} list")
    old = [line.removeprefix("      - ") for line in match.group(2).splitlines()]
    return text[:match.start(2)] + "".join(f"      - {e}\n" for e in entries(old)) + text[match.end(2):]


def _code_first(code: list[str]):
    """A deps list with its code entries replaced by `code`, where the first of them stood."""
    def entries(old: list[str]) -> list[str]:
        is_code = [e.startswith(("mixer/", "pipeline/")) and e.endswith(".py") for e in old]
        at = is_code.index(True) if True in is_code else 0
        rest = [e for (e, c) in zip(old, is_code) if not c]
        return rest[:at] + code + rest[at:]
    return entries


def synced(root: Path) -> dict[Path, str]:
    """Each derived file's text as the declarations make it (README table, dvc.yaml lists, presets' keys)."""
    out = {}
    values = read_yaml(root / PARAMS_FILE)
    readme = (root / "README.md").read_text(encoding="utf-8")
    if TABLE_START in readme and TABLE_END in readme:
        head, rest = readme.split(TABLE_START, 1)
        out[root / "README.md"] = f"{head}{TABLE_START}\n{markdown_table(values)}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
    dvc = (root / "dvc.yaml").read_text(encoding="utf-8")
    for stage in ("check", *STAGES):
        dvc = _dvc_list(dvc, stage, "params", lambda old: stage_keys(stage))
        dvc = _dvc_list(dvc, stage, "deps", _code_first(stage_code(root, stage)))
    out[root / "dvc.yaml"] = dvc
    for preset in sorted((root / "presets").glob("*.yaml")):  # a new key joins each preset at its default
        text = preset.read_text(encoding="utf-8")
        missing = [k for k in KEYS.values() if k.name not in (read_yaml(preset) or {})]
        out[preset] = text + "".join(f"{k.name}: {_yaml_value(k.default)}\n" for k in missing)
    return out


def main(argv: list[str]) -> int:
    """--check: exit 1 when a derived file is out of step; --sync: rewrite them; --table: print the table."""
    root = Path.cwd()
    if argv == ["--table"]:
        print(markdown_table(read_yaml(root / PARAMS_FILE)))
        return 0
    stale = {path: text for (path, text) in synced(root).items() if path.read_text(encoding="utf-8") != text}
    if argv == ["--sync"]:
        for (path, text) in stale.items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(root)}")
        return 0
    if argv == ["--check"]:
        for path in stale:
            print(f"{path.relative_to(root)} is out of step with the declarations: run python -m pipeline.params --sync")
        return 1 if stale else 0
    print("usage: python -m pipeline.params --check | --sync | --table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
