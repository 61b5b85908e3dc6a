"""Where the pipeline keeps its files (the same paths dvc.yaml names)."""

from pathlib import Path

PREPARED = Path("prepared")          # decoded, split cache (a DVC output)
REPORTS = Path("reports")            # small files committed to git
DATA_REPORT = REPORTS / "data.json"
TRAIN_LOG = REPORTS / "train"        # dvclive: metrics.json, plots/metrics/*.tsv, params.yaml
FIGURES = REPORTS / "figures"
