"""Stage `prepare`: data source → prepared/ (images.npy, manifest.csv) and reports/data.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.progress import Progress

from mixer.data import PrepareConfig, open_source, prepare
from mixer.errors import MixerError
from pipeline.params import load_params
from pipeline.paths import DATA_REPORT, PREPARED


def run(params_file: Path, overrides: dict, workers: int) -> dict:
    p = load_params(params_file, overrides)
    if workers < 1:
        raise MixerError(f"--workers must be at least 1, got {workers}")
    config = PrepareConfig(image_shape=p.image_shape, resize=p.resize, val_fraction=p.val_fraction,
                           test_fraction=p.test_fraction, seed=p.seed, num_classes=p.num_classes,
                           strict=p.strict, drop_duplicates=p.drop_duplicates)
    staging = PREPARED.with_name(PREPARED.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = open_source(p.data, staging)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"decoding {len(source.items)} images", total=len(source.items))
        report = prepare(source, staging, config, workers, progress=lambda: bar.advance(task))
    # Only a complete cache replaces the previous one.
    shutil.rmtree(PREPARED, ignore_errors=True)
    staging.rename(PREPARED)
    DATA_REPORT.parent.mkdir(parents=True, exist_ok=True)
    DATA_REPORT.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    counts = {split: sum(c.values()) for (split, c) in report["counts"].items()}
    print(f"prepared {len(report['classes'])} classes: {counts}; skipped {len(report['skipped'])}, "
          f"cross-split duplicates {len(report['duplicates'])}")
    return report
