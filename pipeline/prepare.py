"""Stage `prepare`: data source → prepared/ (images.npy, manifest.csv, prepared.json) and reports/data.json."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from rich.progress import Progress

from mixer.data import PrepareConfig, check_source, prepare
from mixer.errors import MixerError
from mixer.resources import check_prepare_disk
from mixer.sources import open_source
from pipeline.outputs import PREPARED as CACHE, REPORT, Plan, Target, writing
from pipeline.params import Params, build, input_shape, load_params
from pipeline.paths import DATA_REPORT, PREPARED


def plan(p: Params) -> Plan:
    """What `mixer prepare` writes and reads (checked by `mixer check` too; see pipeline.outputs)."""
    return Plan(targets=(Target(PREPARED, CACHE), Target(DATA_REPORT, REPORT)),
                inputs=(Path(p.dataset),) if p.dataset != "digits" else ())


def run(params_file: Path, overrides: dict, workers: int) -> dict:
    p = load_params(params_file, overrides, stage="prepare")
    plan(p).verify()  # before any work
    if workers < 1:
        raise MixerError(f"--workers must be at least 1, got {workers}")
    config = build(PrepareConfig, p, image_shape=input_shape(p))
    with tempfile.TemporaryDirectory() as scratch, writing("mixer prepare", plan(p)) as staging:
        source = open_source(p.dataset, Path(scratch))
        check_source(source, config)  # before anything is staged
        cache, data_report = staging.dir(PREPARED), staging.file(DATA_REPORT)
        check_prepare_disk(len(source.items), config.image_shape, cache)  # before decoding into a sparse file
        with Progress(transient=True, disable=not sys.stdout.isatty()) as bar:
            task = bar.add_task(f"decoding {len(source.items)} images", total=len(source.items))
            report = prepare(source, cache, config, workers, progress=lambda: bar.advance(task))
        data_report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = {split: sum(c.values()) for (split, c) in report["counts"].items()}
    print(f"prepared {len(report['classes'])} classes: {counts}; skipped {len(report['skipped'])}, "
          f"cross-split duplicates {len(report['duplicates'])}, label conflicts {len(report['label_conflicts'])}")
    if report["label_conflicts"]:
        print(f"warning: {len(report['label_conflicts'])} image(s) have two labels: a path a CSV lists twice keeps "
              "its first label, the same content in two class folders is kept in both (see "
              f"{DATA_REPORT}; strict: true makes either an error)", file=sys.stderr)
    return report
