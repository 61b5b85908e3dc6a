"""Inference on image files with a loaded model directory: the same preprocessing as evaluation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from mixer.decoding import decode_many
from mixer.errors import MixerError
from mixer.model import MlpMixer
from mixer.preprocess import to_float
from mixer.sources import find_images, printable


def list_images(paths: list[Path]) -> tuple[list[Path], list[dict]]:
    """Files as given, and the image files under folders (recursive, sorted; hidden, special and
    looping entries skipped and returned with their reason)."""
    found: list[Path] = []
    skipped: list[dict] = []
    for path in map(Path, paths):
        if path.is_dir():
            images, skips = find_images(path)
            found += images
            skipped += [{"path": printable(path / s["path"]), "error": s["reason"]} for s in skips]
        elif path.exists() or path.is_symlink():
            found.append(path)  # decoding says what is wrong with it, in its row
        else:
            raise MixerError(f"{printable(path)} does not exist")
    if not found and not skipped:
        raise MixerError(f"no images found in {', '.join(printable(p) for p in paths)}")
    return found, skipped


def preprocess(model: MlpMixer, arrays: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → the normalised float batch the model was trained on."""
    return model.preprocessing.standardize(to_float(torch.from_numpy(arrays)))


def predict_files(model: MlpMixer, paths: list[Path], top_k: int = 5, batch_size: int = 64,
                  workers: int = 1) -> pd.DataFrame:
    """One row per file, in the order given: path, top-k labels and probabilities, or the error that
    kept it unread."""
    chunks = list(predict_batches(model, paths, top_k, batch_size, workers))
    return pd.concat(chunks, ignore_index=True) if chunks else _table([], prediction_columns(model, top_k))


@torch.inference_mode()
def predict_batches(model: MlpMixer, paths: list[Path], top_k: int = 5, batch_size: int = 64,
                    workers: int = 1) -> Iterator[pd.DataFrame]:
    """`predict_files` as a stream of tables of about `batch_size` rows, in the order given: files
    decode in up to `workers` processes (never more than there are files or usable CPUs: another
    would only wait) while the model runs, and memory stays flat in the number of files."""
    if top_k < 1:
        raise MixerError(f"--top-k must be at least 1, got {top_k}")
    if workers < 1:
        raise MixerError(f"--workers must be at least 1, got {workers}")
    cpus = usable_cpus()
    workers = max(1, min(workers, len(paths), cpus))
    classes, columns = model.class_names, prediction_columns(model, top_k)
    k = min(top_k, len(classes))
    jobs = [(i, path, model.config.image_shape, model.preprocessing.resize) for (i, path) in enumerate(paths)]
    pending: list[tuple[Path, np.ndarray | None, str | None]] = []

    def flush() -> pd.DataFrame:
        arrays = [a for (_, a, _) in pending if a is not None]
        top = None
        if arrays:
            probabilities = torch.softmax(model(preprocess(model, np.stack(arrays))).float(), dim=1)
            top = iter(zip(*(t.tolist() for t in probabilities.topk(k, dim=1))))
        rows = []
        for (path, array, error) in pending:
            row = {"path": printable(path), "error": error or ""}
            if array is not None:
                (p, i) = next(top)
                for rank in range(k):
                    row[f"label_{rank + 1}"] = classes[i[rank]]
                    row[f"prob_{rank + 1}"] = round(p[rank], 6)
            rows.append(row)
        pending.clear()
        return _table(rows, columns)

    threads = torch.get_num_threads()
    if workers > 1:  # leave the decoding processes their cores: idle torch threads spin and take them
        torch.set_num_threads(max(1, min(threads, cpus - workers)))
    try:
        for (index, array, _, error) in decode_many(jobs, workers, ordered=True):
            pending.append((paths[index], array, error))
            if len(pending) >= batch_size:
                yield flush()
        if pending:
            yield flush()
    finally:
        torch.set_num_threads(threads)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container or `taskset` limits it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity on this platform (macOS, Windows)
        return os.cpu_count() or 1


ONNX_FILE = "model.onnx"  # what `mixer export` writes beside a model's weights


def prediction_columns(model: MlpMixer, top_k: int) -> list[str]:
    return columns_for(min(top_k, len(model.class_names)))


def columns_for(k: int) -> list[str]:
    """The columns of a predictions file with `k` labels per image."""
    return ["path"] + [c for r in range(1, k + 1) for c in (f"label_{r}", f"prob_{r}")] + ["error"]


def _table(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, dtype=object).reindex(columns=columns, fill_value="").fillna("")


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
        raise MixerError(f"ONNX export of {path} differs from PyTorch by {difference:.2e} (> {atol:.0e})")
    return difference
