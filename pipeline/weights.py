"""`mixer import-weights`: a public MLP-Mixer checkpoint → a model directory this tool trains and evaluates."""

from __future__ import annotations

from pathlib import Path

from mixer.checkpoint import CONFIG
from mixer.errors import MixerError
from mixer.model import MlpMixer
from mixer.pretrained import import_weights, is_remote
from pipeline.outputs import MODEL, Plan, Target, writing


def run(source: str, out_dir: Path, image_shape: tuple[int, int] | None, force: bool) -> MlpMixer:
    out_dir = Path(out_dir)
    plan = Plan(targets=(Target(out_dir, MODEL, "OUT_DIR"),), inputs=() if is_remote(source) else (Path(source),))
    plan.verify()  # before any download: a folder of the user's is never replaced
    if (out_dir / CONFIG).is_file() and not force:
        raise MixerError(f"{out_dir} already holds a model; pass --force to replace it")
    with writing("mixer import-weights", plan) as staging:
        return import_weights(source, staging.dir(out_dir), image_shape)
