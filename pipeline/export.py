"""`mixer export --format onnx`: the model next to its weights, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

from mixer.checkpoint import load_model
from mixer.inference import ONNX_FILE, export_onnx
from mixer.text import shown
from pipeline.outputs import ONNX, Plan, Target, writing
from pipeline.params import load_params


def run(model_dir: Path | None, params_file: Path) -> None:
    directory = Path(model_dir or load_params(params_file).output_dir)
    target = directory / ONNX_FILE
    named = "--model" if model_dir else "output_dir"
    plan = Plan(targets=(Target(target, ONNX, named),), locks=(directory,))  # train writes that folder too
    with writing("mixer export", plan) as staging:
        model = load_model(directory)  # under the lock: the ONNX file is of the weights beside it
        difference = export_onnx(model, staging.file(target))
    print(f"wrote {shown(target)} (dynamic batch); max |ONNX - PyTorch| = {difference:.2e}")
