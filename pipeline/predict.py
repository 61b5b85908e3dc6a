"""`mixer predict`: images or folders → top-k labels and probabilities (a rich table, optionally a CSV)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from mixer.checkpoint import atomic_write, load_model
from mixer.inference import list_images, predict_files
from pipeline.params import load_params


def run(paths: list[Path], model_dir: Path | None, top_k: int, out: Path | None, params_file: Path) -> None:
    model = load_model(model_dir or Path(load_params(params_file).output_dir))
    table = predict_files(model, list_images(paths), top_k)
    if out is not None:
        atomic_write(Path(out), lambda tmp: table.to_csv(tmp, index=False))
    view = Table(title=f"{len(table)} image(s)")
    for column in table.columns:
        view.add_column(column, overflow="fold")
    for row in table.itertuples(index=False):
        view.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(view)
