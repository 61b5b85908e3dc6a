"""`mixer export --format onnx`: the model next to its weights, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

from mixer.checkpoint import load_model
from mixer.inference import export_onnx
from pipeline.params import load_params


def run(model_dir: Path | None, params_file: Path) -> None:
    directory = Path(model_dir or load_params(params_file).output_dir)
    model = load_model(directory)
    difference = export_onnx(model, directory / "model.onnx")
    print(f"wrote {directory / 'model.onnx'} (dynamic batch); max |ONNX - PyTorch| = {difference:.2e}")
