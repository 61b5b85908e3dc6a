"""`mixer predict`: images or folders → top-k labels and probabilities.

Files decode in worker processes while the model runs; predictions stream to `--out` (CSV, or JSON
Lines) batch by batch, so memory stays flat however many images there are. A few images are shown
as a table; many as a summary (counts, errors, the most predicted classes). `--format` without
`--out` streams the rows to standard output instead, as tools with a machine-readable output format
do (`... --format json | jq`), and nothing else is printed there.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from mixer.checkpoint import load_model
from mixer.data import write_csv
from mixer.errors import MixerError
from mixer.inference import list_images, predict_batches, prediction_columns
from mixer.pretrained import is_remote, load_pretrained, model_directory
from mixer.text import shown
from pipeline.outputs import PREDICTIONS, Plan, Target, writing
from pipeline.params import load_params

FORMATS = ("csv", "json")
SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}  # what a name says it holds
TABLE_ROWS = 20  # more images than this are summed up instead of listed


def output_format(out: Path | None, format: str | None) -> str | None:
    """The format the predictions are written in: `--format`, else the one `--out`'s name says (csv for
    another name); None without either (a table on the console). A name saying the other format is an error."""
    if format is not None and format not in FORMATS:
        raise MixerError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    named = SUFFIXES.get(Path(out).suffix.lower()) if out is not None else None
    if format is not None and named is not None and named != format:
        raise MixerError(f"--out {shown(out)} names a {named.upper()} file but --format is {format}: name it "
                         f"{shown(Path(out).with_suffix('.' + format))} or leave --format out (the name decides)")
    return format or named or ("csv" if out is not None else None)


def run(paths: list[Path], model_spec: str | None, top_k: int, out: Path | None, params_file: Path,
        workers: int = 2, format: str | None = None) -> None:
    format = output_format(out, format)
    stream = out is None and format is not None  # the rows themselves are the output: to stdout, nothing else
    if model_spec is None and not Path(params_file).exists():  # outside a project: say how to name the model
        raise MixerError(f"no --model given and no {params_file} here to take output_dir from; name the model: "
                         "--model DIR (a trained model folder), hf-hub:owner/name, an https:// URL or a weights file")
    spec = model_spec or load_params(params_file).output_dir
    images, skipped = list_images(paths)
    if out is not None:  # before any work: --out is not an image it reads, a device, or a file of the user's
        plan = Plan(targets=(Target(Path(out), PREDICTIONS, "--out"),),
                    inputs=(*paths, *images, *(() if is_remote(spec) else (Path(spec),))))
        plan.verify()
    folder = Path(spec) if Path(spec).is_dir() else model_directory(spec)  # a folder, or its model.safetensors
    if folder is None and not is_remote(spec) and Path(spec).is_file():
        # bare weights: nothing says the class names or normalisation, and index labels look like real ones
        print(f"note: {shown(spec)} has no config.json of this project beside it: labels are class indices and "
              "the normalisation is the default (mean 0.5, std 0.5)", file=sys.stderr)
    model = (load_model(folder) if folder is not None else load_pretrained(spec)).eval()
    classes = len(model.class_names)
    if top_k > classes:  # asked for more labels than exist: all of them, said rather than silently
        print(f"note: --top-k {top_k} is more than the model's {classes} classes: each image gets all {classes}",
              file=sys.stderr)
    console = Console()
    listed: list[pd.DataFrame] = []  # the rows of a short run, for the table
    labels: collections.Counter = collections.Counter()
    errors: list[tuple[str, str]] = []
    started = time.perf_counter()
    with (writing("mixer predict", plan) if out is not None else nullcontext()) as staging:
        sink = open(staging.file(out), "w", encoding="utf-8", newline="") if out is not None else \
            sys.stdout if stream else None
        try:
            with _reader_may_leave(stream), Progress(transient=True, disable=stream or not sys.stdout.isatty()) as bar:
                task = bar.add_task(f"predicting {len(images)} images", total=len(images))
                tail = pd.DataFrame(skipped, dtype=object).reindex(columns=prediction_columns(model, top_k), fill_value="")
                for (n, chunk) in enumerate(_chunks(predict_batches(model, images, top_k, workers=workers), tail)):
                    if sink is not None:
                        _write(chunk, sink, format, first=n == 0)
                    labels.update(v for v in chunk.get("label_1", []) if v)
                    errors += [(p, e) for (p, e) in zip(chunk["path"], chunk["error"]) if e]
                    if len(images) + len(skipped) <= TABLE_ROWS:
                        listed.append(chunk)
                    bar.advance(task, len(chunk))
        finally:
            if out is not None:
                sink.close()
    seconds = time.perf_counter() - started
    if stream:
        with _reader_may_leave(stream):
            sink.flush()
        return
    if listed:
        _print_table(console, pd.concat(listed, ignore_index=True))
    else:
        _print_summary(console, len(images) + len(skipped), labels, errors, seconds)
    if out is not None:
        console.print(Text(f"wrote {shown(out)}"))


def _chunks(batches, tail: pd.DataFrame):
    yield from batches
    if len(tail):
        yield tail


def _write(chunk: pd.DataFrame, sink, format: str, first: bool) -> None:
    if format == "csv":
        write_csv(chunk, sink, header=first)
    else:  # JSON Lines: one object per image, so a stream can be read as it grows
        chunk.to_json(sink, orient="records", lines=True, force_ascii=False)


def _print_table(console: Console, table: pd.DataFrame) -> None:
    """One line per image: the path (its end, if it takes over half the terminal: the file name is what the
    user looks for), then the top-k as one column that wraps, and the error column only when an image
    could not be read."""
    room = max(20, console.width // 2)
    labels = [c for c in table.columns if c.startswith("label_")]
    failed = bool((table["error"] != "").any())
    view = Table(title=f"{len(table)} image(s)")
    view.add_column("path", no_wrap=True)
    view.add_column(f"top {len(labels)}", overflow="fold")
    if failed:
        view.add_column("error", overflow="fold")
    for row in table.to_dict("records"):  # Text, not markup: a file may be called "[bold]x.jpg"
        # shown: rich passes ESC through, so a file or class name could drive the terminal
        top = "  ".join(f"{shown(row[c])} {row['prob_' + c[6:]]:.2f}" for c in labels if row[c] != "")
        path = shown(row["path"])
        view.add_row(Text(path if len(path) <= room else "…" + path[1 - room:]), Text(top), *([Text(shown(row["error"]))] if failed else []))
    console.print(view)


def _print_summary(console: Console, total: int, labels: collections.Counter, errors: list[tuple[str, str]],
                   seconds: float) -> None:
    console.print(Text(f"{total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s): "
                       f"{sum(labels.values())} predicted, {len(errors)} could not be read"))
    if labels:
        console.print(Text("most predicted: " + ", ".join(f"{shown(name)} {count}"
                                                         for (name, count) in labels.most_common(5))))
    for (path, error) in errors[:3]:
        console.print(Text(f"  {shown(path)}: {shown(error)}"))
    if len(errors) > 3:
        console.print(Text(f"  and {len(errors) - 3} more (see the error column of --out)"))


@contextmanager
def _reader_may_leave(stream: bool):
    """Rows streamed to stdout: a reader that stops early (`| head -3`) ends the command quietly, as it
    ends `cat`, instead of with a BrokenPipeError traceback (and another from the flush at exit)."""
    try:
        yield
    except BrokenPipeError:
        if not stream:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        raise SystemExit(0) from None
