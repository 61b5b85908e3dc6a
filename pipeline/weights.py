"""`mixer import-weights`: a public MLP-Mixer checkpoint → a model directory this tool trains and evaluates."""

from __future__ import annotations

from pathlib import Path

from mixer.checkpoint import CONFIG
from mixer.errors import MixerError
from mixer.model import MlpMixer
from mixer.pretrained import import_weights
from pipeline.outputs import writing


def run(source: str, out_dir: Path, image_shape: tuple[int, int] | None, force: bool) -> MlpMixer:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MixerError(f"{out_dir} is a file; give a folder for the model")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / CONFIG).is_file():
            raise MixerError(f"{out_dir} is a folder that holds something other than a model; choose an empty or "
                             "new folder")
        if not force:
            raise MixerError(f"{out_dir} already holds a model; pass --force to replace it")
    with writing("mixer import-weights", out_dir) as staging:
        return import_weights(source, staging.dir(out_dir), image_shape)
