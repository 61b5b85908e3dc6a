"""MLP-Mixer image classifiers (Tolstikhin et al. 2021): the library behind the `mixer` pipeline.

    import mixer
    model = mixer.create_model("S/16", image_shape=(224, 224), num_classes=120)   # a fresh model
    model = mixer.load_model("output")                    # a trained model directory, hf-hub:..., a URL
    table = mixer.predict(model, ["photos/", "cat.jpg"], top_k=3)   # a pandas DataFrame, one row per image
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mixer.model import VARIANTS, MixerConfig, MlpMixer, create_model

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["VARIANTS", "MixerConfig", "MlpMixer", "create_model", "load_model", "predict"]


def load_model(spec: str | Path, device: str = "cpu") -> MlpMixer:
    """A model ready for inference from a model directory, a weights file, `hf-hub:owner/name[@rev]`
    or an https:// URL (see `mixer.pretrained`); `model.source` says where it came from."""
    from mixer.pretrained import load_pretrained

    return load_pretrained(str(spec)).to(device).eval()


def predict(model: MlpMixer, images: list[str | Path], top_k: int = 5) -> pd.DataFrame:
    """Classify image files and folders of them: path, top-k labels and probabilities, or the error
    that kept a file unread, one row per image in the order given (files skipped while listing a
    folder, such as FIFOs or link loops, come last with their reason)."""
    import pandas as pd

    from mixer.inference import list_images, predict_files

    found, skipped = list_images([Path(p) for p in images])
    table = predict_files(model.eval(), found, top_k)
    return pd.concat([table, pd.DataFrame(skipped)], ignore_index=True).fillna("") if skipped else table
