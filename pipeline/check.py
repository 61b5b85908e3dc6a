"""Stage `check`: every params key, the paths the params name, and what each stage will write.

Every stage depends on this one's output, whose content never changes: when params.yaml changes,
this stage runs first and stops `dvc repro` with one line if something is wrong, before any stage
has run (the outs are `persist: true`, so a stage that still fails keeps its previous outputs);
when it passes, DVC still re-runs only the stages whose own params changed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from mixer.data import PrepareConfig, check_source
from mixer.errors import MixerError
from mixer.sources import open_source
from mixer.survey import survey
from mixer.text import shown
from pipeline import evaluate, prepare, train
from pipeline.outputs import REPORT, Plan, Target, writing
from pipeline.params import build, input_shape, load_params, notes
from pipeline.paths import DATA_DIR, PARAMS_CHECKED

CHECKED = "params.yaml passed `mixer check` (its content never changes; DVC stages depend on it)\n"


def check_data(p, under_dvc: bool) -> list[str]:
    """The data source, listed (nothing decoded): what prepare would refuse stops here, before any stage runs.
    Under DVC it must lie in data/, the folder dvc.yaml tracks for prepare: a change elsewhere would
    leave `dvc repro` saying all is up to date."""
    if p.dataset == "digits":  # embedded: always the same images
        return []
    data = Path(p.dataset)
    tracked = Path(os.path.realpath(DATA_DIR))
    real = Path(os.path.realpath(data))
    if under_dvc and not real.is_relative_to(tracked) and Path(os.path.abspath(data)).is_relative_to(
            os.path.abspath(DATA_DIR)):
        raise MixerError(f"dataset {shown(p.dataset)} is a link out of {DATA_DIR}/, the folder dvc.yaml tracks: `dvc repro` "
                         f"would not see its images change; put a copy there instead (rm {shown(p.dataset)} && cp -r "
                         f"{shown(str(real))} {shown(p.dataset)})")
    if under_dvc and not real.is_relative_to(tracked):
        raise MixerError(f"dataset {shown(p.dataset)} is outside {DATA_DIR}/, the folder dvc.yaml tracks: `dvc repro` "
                         f"would not see its images change; copy it in (cp -r {shown(p.dataset)} {DATA_DIR}/) and set "
                         f"dataset: {DATA_DIR}/{data.name}")
    with tempfile.TemporaryDirectory() as scratch:
        source = open_source(p.dataset, Path(scratch))
        check_source(source, build(PrepareConfig, p, image_shape=p.image_shape))
        return survey(source).lines(p.image_shape)  # what the data holds, against what it becomes


def run(params_file: Path, overrides: dict) -> None:
    p = load_params(params_file, overrides)
    described = check_data(p, under_dvc="DVC_STAGE" in os.environ)
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
    for line in described:  # after every check: a command that fails prints its one line alone
        print(line)
    for line in notes(p):
        print(line, file=sys.stderr)
    print(f"{shown(params_file)}: every key is valid; dataset {shown(p.dataset)}; checkpoint {shown(p.checkpoint or 'none')}")
