"""Inference on image files with a loaded model directory: the same preprocessing as evaluation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mixer.data import decode, is_image_file
from mixer.engine import normalize
from mixer.errors import MixerError
from mixer.model import MlpMixer


def list_images(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files under folders (recursive, sorted, hidden ones skipped)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.relative_to(path)))
        elif path.exists():
            out.append(path)
        else:
            raise MixerError(f"{path} does not exist")
    if not out:
        raise MixerError(f"no images found in {', '.join(map(str, paths))}")
    return out


def preprocess(model: MlpMixer, arrays: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → the normalised float batch the model was trained on."""
    meta = getattr(model, "meta", {}).get("normalization", {"mean": [0.5] * 3, "std": [0.5] * 3})
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (normalize(torch.from_numpy(arrays)) - mean) / std


@torch.inference_mode()
def predict_files(model: MlpMixer, paths: list[Path], top_k: int = 5, batch_size: int = 64) -> pd.DataFrame:
    """One row per file: path, top-k labels and probabilities, or the error that kept it unread."""
    classes = getattr(model, "meta", {}).get("class_names") or [str(i) for i in range(model.config.num_classes)]
    k = min(top_k, len(classes))
    if k < 1:
        raise MixerError(f"--top-k must be at least 1, got {top_k}")
    shape = model.config.image_shape
    policy = getattr(model, "meta", {}).get("resize", "stretch")
    rows: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        arrays, good = [], []
        for path in chunk:
            try:
                arrays.append(decode(path, shape, policy)[0])
                good.append(path)
            except ValueError as exc:
                rows.append({"path": str(path), "error": str(exc)})
        if arrays:
            probabilities = torch.softmax(model(preprocess(model, np.stack(arrays))).float(), dim=1)
            top = probabilities.topk(k, dim=1)
            for (path, p, i) in zip(good, top.values.tolist(), top.indices.tolist()):
                row = {"path": str(path), "error": ""}
                for rank in range(k):
                    row[f"label_{rank + 1}"] = classes[i[rank]]
                    row[f"prob_{rank + 1}"] = round(p[rank], 6)
                rows.append(row)
    order = {str(p): n for (n, p) in enumerate(paths)}
    table = pd.DataFrame(rows, dtype=object).fillna("")
    table = table.sort_values("path", key=lambda s: s.map(order)).reset_index(drop=True)
    columns = ["path"] + [c for r in range(1, k + 1) for c in (f"label_{r}", f"prob_{r}")] + ["error"]
    return table.reindex(columns=columns, fill_value="")


def export_onnx(model: MlpMixer, path: Path, atol: float = 1e-4) -> float:
    """Write an ONNX model with a dynamic batch axis and return its max difference from PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        raise MixerError("ONNX export needs the optional packages: pip install -e '.[onnx]'") from None
    model = model.eval()
    h, w = model.config.image_shape
    example = torch.randn(2, model.config.in_chans, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.randn(5, model.config.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(check).numpy()
    got = session.run(None, {"images": check.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > atol:
        path.unlink()
        raise MixerError(f"ONNX export of {path} differs from PyTorch by {difference:.2e} (> {atol:.0e})")
    return difference
