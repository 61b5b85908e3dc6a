"""Where the pipeline keeps its files (the same paths dvc.yaml names)."""

from pathlib import Path

DATA_DIR = Path("data")              # where user data lives; dvc.yaml tracks it for prepare
PREPARED = Path("prepared")          # decoded, split cache (a DVC output)
REPORTS = Path("reports")            # small files committed to git
DATA_REPORT = REPORTS / "data.json"
TRAIN_LOG = REPORTS / "train"        # dvclive: metrics.json, plots/metrics/*.tsv, params.yaml
FIGURES = REPORTS / "figures"
CHECKPOINTS = Path("checkpoints")    # one folder per output_dir, in it one per run: its resumable state; not
                                     # a DVC output, so it survives what DVC deletes before a stage runs
PARAMS_CHECKED = REPORTS / "params-check.txt"  # written by `mixer check`; every stage depends on it
