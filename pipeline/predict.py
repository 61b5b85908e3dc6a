"""`mixer predict`: images or folders → top-k labels and probabilities (a rich table, optionally a CSV)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mixer import predict
from mixer.checkpoint import load_model
from mixer.data import write_csv
from pipeline.outputs import writing
from pipeline.params import load_params


def run(paths: list[Path], model_dir: Path | None, top_k: int, out: Path | None, params_file: Path) -> None:
    model = load_model(model_dir or Path(load_params(params_file).output_dir))
    table = predict(model, paths, top_k)
    if out is not None:
        with writing("mixer predict", out) as staging:
            write_csv(table, staging.file(out))
    view = Table(title=f"{len(table)} image(s)")
    for column in table.columns:
        view.add_column(column, overflow="fold")
    for row in table.itertuples(index=False):  # Text, not markup: a file may be called "[bold]x.jpg"
        view.add_row(*[Text(f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row])
    Console().print(view)
