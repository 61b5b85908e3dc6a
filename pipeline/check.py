"""Stage `check`: every params key, the paths the params name, and what each stage will write.

Every stage depends on this one's output, whose content never changes: when params.yaml changes,
this stage runs first and stops `dvc repro` with one line if something is wrong, before any stage
has run (the outs are `persist: true`, so a stage that still fails keeps its previous outputs);
when it passes, DVC still re-runs only the stages whose own params changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from mixer.errors import MixerError
from mixer.text import shown
from pipeline import evaluate, prepare, train
from pipeline.outputs import REPORT, Plan, Target, writing
from pipeline.params import input_shape, load_params
from pipeline.paths import PARAMS_CHECKED

CHECKED = "params.yaml passed `mixer check` (its content never changes; DVC stages depend on it)\n"


def run(params_file: Path, overrides: dict) -> None:
    p = load_params(params_file, overrides)
    data = Path(p.data)
    if p.data != "digits" and not (data.is_dir() or data.suffix.lower() == ".csv" and data.is_file()):
        raise MixerError(f"{params_file}: data {p.data} is neither 'digits', a folder, nor a CSV file")
    for stage in (prepare, train, evaluate):  # what each stage will write: before DVC deletes anything
        stage.plan(p).verify()
    if "DVC_STAGE" in os.environ and not Path(os.path.realpath(p.output_dir)).is_relative_to(os.path.realpath(".")):
        raise MixerError(f"output_dir {shown(p.output_dir)} is outside the project, where DVC cannot track it (DVC 3 "
                         "refuses outputs outside the repository, after training); choose a folder inside the "
                         "project, or run `mixer train` without DVC")
    input_shape(p)  # reads the checkpoint, if any (fetching it once into the cache)
    train.check_memory(p)  # a batch that cannot fit stops here, not after DVC has deleted the model
    with writing("mixer check", Plan(targets=(Target(PARAMS_CHECKED, REPORT),))) as staging:
        staging.file(PARAMS_CHECKED).write_text(CHECKED)
    print(f"{shown(params_file)}: every key is valid; data {shown(p.data)}; checkpoint {shown(p.checkpoint or 'none')}")
