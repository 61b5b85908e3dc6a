"""Stage `evaluate`: output_dir + prepared/ → reports/ (metrics, per-class CSV, confusion, figures, README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mixer.checkpoint import load_model
from mixer.data import Prepared, open_prepared, write_csv
from mixer.errors import MixerError
from mixer.evaluation import split_logits
from mixer.figures import confusion_figure, learning_curves_figure, mistakes_figure
from mixer.metrics import score
from mixer.model import MlpMixer
from mixer.resources import check_inference_memory
from mixer.text import markdown, param_text, shown
from pipeline.outputs import FIGURES as FIGURES_DIR, REPORT, Plan, Target, writing
from pipeline.params import KEYS, Params, load_params
from pipeline.paths import FIGURES, PREPARED, REPORTS, TRAIN_LOG

OUTPUTS = {name: REPORTS / name for name in ("metrics.json", "per_class.csv", "confusion.csv", "README.md")}
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction")


def plan(p: Params) -> Plan:
    """What `mixer evaluate` writes and reads (checked by `mixer check` too; see pipeline.outputs)."""
    return Plan(targets=(Target(FIGURES, FIGURES_DIR), *(Target(path, REPORT) for path in OUTPUTS.values())),
                inputs=(Path(p.output_dir), PREPARED, TRAIN_LOG))


def run(params_file: Path, overrides: dict, other_data: bool = False) -> dict:
    p = load_params(params_file, overrides, stage="evaluate")
    plan(p).verify()  # before any work
    model = load_model(Path(p.output_dir))
    check_inference_memory(model.config, p.eval_batch_size, device="cpu")  # where split_logits scores
    prepared = open_prepared(PREPARED)
    check_fits(model, Path(p.output_dir), prepared)
    scored = check_data(model, Path(p.output_dir), prepared, other_data)
    classes = model.class_names
    test, val = prepared.split("test"), prepared.split("val")
    test_scores = score(*split_logits(model, test, model.preprocessing, p.eval_batch_size), classes)
    val_scores = score(*split_logits(model, val, model.preprocessing, p.eval_batch_size), classes)
    if not (np.isfinite(test_scores.loss) and np.isfinite(val_scores.loss)):
        raise MixerError(f"the model in {p.output_dir} gives non-finite outputs; train it again")
    metrics = {
        "accuracy": test_scores.accuracy,
        "top5_accuracy": test_scores.top5_accuracy,
        "loss": test_scores.loss,
        "val": {"accuracy": val_scores.accuracy, "top5_accuracy": val_scores.top5_accuracy,
                "loss": val_scores.loss},
        "test_images": len(test),
        "data": scored,
    }
    with writing("mixer evaluate", plan(p)) as staging:
        out = {name: staging.file(path) for (name, path) in OUTPUTS.items()}
        out["metrics.json"].write_text(json.dumps(metrics, indent=2) + "\n")
        write_csv(test_scores.per_class.round(4), out["per_class.csv"])
        write_csv(pd.DataFrame({"actual": [classes[i] for i in test.labels],
                                "predicted": [classes[i] for i in test_scores.predicted]}), out["confusion.csv"])
        write_figures(test_scores, test, classes, staging.dir(FIGURES))
        out["README.md"].write_text(readme(p, metrics), encoding="utf-8")
    print(f"test accuracy {metrics['accuracy']:.4f}, top-5 {metrics['top5_accuracy']}, "
          f"loss {metrics['loss']:.4f} on {len(test)} images")
    return metrics


def check_fits(model: MlpMixer, directory: Path, prepared: Prepared) -> None:
    """Evaluation is meaningful only on data prepared as the model's training data was."""
    again = "train it on this data, or prepare the data it was trained on"
    if model.class_names != prepared.classes:
        theirs, ours = set(model.class_names), set(prepared.classes)
        which = (f"{sorted(theirs - ours)[:3]} only in the model, {sorted(ours - theirs)[:3]} only in the data"
                 if theirs != ours else "the same names in another order")
        raise MixerError(f"the model in {directory} has other classes than {PREPARED} ({which}); {again}")
    if model.config.image_shape != prepared.image_shape:
        raise MixerError(f"the model in {directory} takes {list(model.config.image_shape)} images but {PREPARED} "
                         f"holds {list(prepared.image_shape)}; {again}")
    if model.preprocessing.resize != prepared.resize:
        raise MixerError(f"the model in {directory} was trained on images resized by {model.preprocessing.resize} "
                         f"but {PREPARED} used {prepared.resize}; {again}")


def check_data(model: MlpMixer, directory: Path, prepared: Prepared, other_data: bool) -> dict:
    """Which data is scored (the prepared hash) and whether the model was trained on it; another split or
    other data is refused unless `other_data`, since its test split may hold the model's training images."""
    record = getattr(model, "meta", {}).get("trained_on")
    scored = {"prepared": prepared.data_hash, "matches_model": None}
    if not isinstance(record, dict) or not isinstance(record.get("prepared_data"), str):
        print(f"note: the model in {shown(directory)} does not record the data it was trained on (imported weights "
              f"or an older model); the test split of {PREPARED} may hold images it was trained on")
        return scored
    scored["matches_model"] = record["prepared_data"] == prepared.data_hash
    if scored["matches_model"]:
        return scored
    ours, theirs = _data_text(prepared.data_hash, prepared.split_params), _data_text(record["prepared_data"], record)
    if other_data:
        print(f"note: scoring {PREPARED} ({ours}), not the data the model was trained on ({shown(theirs)}): "
              "--other-data")  # theirs: from the model's config.json
        return scored
    here = prepared.split_params or {}
    flags = " ".join(f"--{k.replace('_', '-')} {record[k]}" for k in SPLIT_KEYS if k in record and k in here
                     and record[k] != here[k])
    again = f"run `mixer prepare {flags}`" if flags else "prepare the data it was trained on"
    raise MixerError(f"{PREPARED} is not the data the model in {directory} was trained on ({PREPARED}: {ours}; the "
                     f"model: {theirs}), so its test split may hold training images; {again}, or pass --other-data "
                     "to score it anyway")


def _data_text(data_hash: str, split: dict | None) -> str:
    """'data 1a2b3c4d5e6f, seed 0, val_fraction 0.1, test_fraction 0.2' (what of the split is known)."""
    return ", ".join([f"data {data_hash[:12]}"] + [f"{k} {split[k]}" for k in SPLIT_KEYS if k in (split or {})])


def write_figures(scores, test, classes: list[str], folder: Path) -> None:
    confusion_figure(scores.confusion, classes, folder / "confusion.png")
    history = read_history(TRAIN_LOG / "plots" / "metrics")
    if history is not None:
        learning_curves_figure(history, folder / "learning_curves.png")
    true_probability = scores.probabilities[np.arange(len(test)), test.labels]
    wrong = np.flatnonzero(scores.predicted != test.labels)
    worst = wrong[np.argsort(true_probability[wrong])][:16]
    mistakes_figure(np.asarray(test.images[worst]), [classes[i] for i in test.labels[worst]],
                    [classes[i] for i in scores.predicted[worst]],
                    scores.probabilities[worst, scores.predicted[worst]], folder / "mistakes.png")


def read_history(folder: Path) -> pd.DataFrame | None:
    """dvclive's per-epoch TSVs (one per metric) joined on `step`."""
    tables = []
    for tsv in sorted(folder.rglob("*.tsv")):
        name = tsv.relative_to(folder).with_suffix("").as_posix()
        try:
            table = pd.read_csv(tsv, sep="\t")
            tables.append(table[["step", table.columns[-1]]].rename(columns={table.columns[-1]: name}))
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            print(f"note: no learning curves: {shown(tsv)} is unreadable ({type(exc).__name__})")
            return None
    if not tables:
        return None
    history = tables[0]
    for table in tables[1:]:
        history = history.merge(table, on="step", how="outer")
    return history.sort_values("step")


def readme(p: Params, metrics: dict) -> str:
    keys = [k for (k, key) in KEYS.items() if key.declaration.affects]  # every key that decides the result
    # markdown(), not a code span: a value (the `dataset` path, a checkpoint URL) may hold a backtick, a
    # `|` or HTML, which a code span does not contain; escaped, it renders as the text it is
    rows = "\n".join(f"| `{k}` | {markdown(param_text(getattr(p, k)))} |" for k in keys)
    return f"""# Run report

Written by `mixer evaluate`. Compare with another commit: `dvc metrics diff`, `dvc plots diff`.

## Metrics (test split, {metrics['test_images']} images)

| metric | test | val |
| --- | --- | --- |
| top-1 accuracy | {_cell(metrics['accuracy'])} | {_cell(metrics['val']['accuracy'])} |
| top-5 accuracy | {_cell(metrics['top5_accuracy'])} | {_cell(metrics['val']['top5_accuracy'])} |
| loss | {_cell(metrics['loss'])} | {_cell(metrics['val']['loss'])} |

Per class: [per_class.csv](per_class.csv). Data: [data.json](data.json).

Scored on prepared data `{metrics['data']['prepared'][:12]}`: {_provenance(metrics['data']['matches_model'])}.

## Params that define the run

| key | value |
| --- | --- |
{rows}

## Figures

![learning curves](figures/learning_curves.png)

![confusion matrix](figures/confusion.png)

![worst mistakes](figures/mistakes.png)
"""


def _provenance(matches_model: bool | None) -> str:
    if matches_model is None:
        return "the model does not record the data it was trained on (imported weights or an older model)"
    return "the data the model was trained on" if matches_model else \
        "**not** the data the model was trained on (`mixer evaluate --other-data`)"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
