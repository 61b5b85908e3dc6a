"""Stage `evaluate`: output_dir + prepared/ → reports/ (metrics, per-class CSV, confusion, figures, README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mixer.checkpoint import load_model
from mixer.data import load_split
from mixer.engine import predict
from mixer.figures import confusion_figure, learning_curves_figure, mistakes_figure
from mixer.metrics import score
from pipeline.params import Params, load_params
from pipeline.paths import FIGURES, PREPARED, REPORTS, TRAIN_LOG


def run(params_file: Path, overrides: dict) -> dict:
    p = load_params(params_file, overrides)
    model = load_model(Path(p.output_dir))
    classes = model.meta["class_names"]
    test, val = load_split(PREPARED, "test"), load_split(PREPARED, "val")
    test_scores = score(*predict(model, test, p.eval_batch_size), classes)
    val_scores = score(*predict(model, val, p.eval_batch_size), classes)
    metrics = {
        "accuracy": test_scores.accuracy,
        "top5_accuracy": test_scores.top5_accuracy,
        "loss": test_scores.loss,
        "val": {"accuracy": val_scores.accuracy, "top5_accuracy": val_scores.top5_accuracy,
                "loss": val_scores.loss},
        "test_images": len(test),
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    test_scores.per_class.to_csv(REPORTS / "per_class.csv", index=False, float_format="%.4f")
    pd.DataFrame({"actual": [classes[i] for i in test.labels],
                  "predicted": [classes[i] for i in test_scores.predicted]}).to_csv(
        REPORTS / "confusion.csv", index=False)
    write_figures(test_scores, test, classes)
    write_readme(p, metrics)
    print(f"test accuracy {metrics['accuracy']:.4f}, top-5 {metrics['top5_accuracy']}, "
          f"loss {metrics['loss']:.4f} on {len(test)} images")
    return metrics


def write_figures(scores, test, classes: list[str]) -> None:
    confusion_figure(scores.confusion, classes, FIGURES / "confusion.png")
    history = read_history(TRAIN_LOG / "plots" / "metrics")
    if history is not None:
        learning_curves_figure(history, FIGURES / "learning_curves.png")
    true_probability = scores.probabilities[np.arange(len(test)), test.labels]
    wrong = np.flatnonzero(scores.predicted != test.labels)
    worst = wrong[np.argsort(true_probability[wrong])][:16]
    mistakes_figure(np.asarray(test.images[worst]), [classes[i] for i in test.labels[worst]],
                    [classes[i] for i in scores.predicted[worst]],
                    scores.probabilities[worst, scores.predicted[worst]], FIGURES / "mistakes.png")


def read_history(folder: Path) -> pd.DataFrame | None:
    """dvclive's per-epoch TSVs (one per metric) joined on `step`."""
    tables = []
    for tsv in sorted(folder.rglob("*.tsv")):
        name = tsv.relative_to(folder).with_suffix("").as_posix()
        table = pd.read_csv(tsv, sep="\t")
        tables.append(table[["step", table.columns[-1]]].rename(columns={table.columns[-1]: name}))
    if not tables:
        return None
    history = tables[0]
    for table in tables[1:]:
        history = history.merge(table, on="step", how="outer")
    return history.sort_values("step")


def write_readme(p: Params, metrics: dict) -> None:
    keys = ["data", "image_shape", "patch_shape", "variant", "depth", "dim", "num_classes", "batch_size",
            "optimizer", "lr", "decay", "num_steps", "warmup_step", "scheduler", "seed"]
    rows = "\n".join(f"| `{k}` | `{_show(getattr(p, k))}` |" for k in keys)
    (REPORTS / "README.md").write_text(f"""# Run report

Written by `mixer evaluate`. Compare with another commit: `dvc metrics diff`, `dvc plots diff`.

## Metrics (test split, {metrics['test_images']} images)

| metric | test | val |
| --- | --- | --- |
| top-1 accuracy | {_cell(metrics['accuracy'])} | {_cell(metrics['val']['accuracy'])} |
| top-5 accuracy | {_cell(metrics['top5_accuracy'])} | {_cell(metrics['val']['top5_accuracy'])} |
| loss | {_cell(metrics['loss'])} | {_cell(metrics['val']['loss'])} |

Per class: [per_class.csv](per_class.csv). Data: [data.json](data.json).

## Params that define the run

| key | value |
| --- | --- |
{rows}

## Figures

![learning curves](figures/learning_curves.png)

![confusion matrix](figures/confusion.png)

![worst mistakes](figures/mistakes.png)
""")


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _show(value) -> str:
    """A params value as YAML writes it."""
    return "null" if value is None else str(list(value) if isinstance(value, tuple) else value)
