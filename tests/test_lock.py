"""A fresh clone is up to date: the committed dvc.lock matches the code and params it was made from,
so `dvc status` in a clone says nothing changed (after `dvc pull`) instead of asking for a rerun."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from conftest import ROOT

LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text()) if (ROOT / "dvc.lock").exists() else {"stages": {}}
AGAIN = "dvc.lock is stale: run `dvc repro` and commit dvc.lock and reports/"


@pytest.mark.parametrize("stage", sorted(LOCK["stages"]))
def test_the_committed_lock_matches_the_code_each_stage_depends_on(stage):
    for dep in LOCK["stages"][stage]["deps"]:
        path = ROOT / dep["path"]
        if dep["md5"].endswith(".dir"):  # a folder: its files are data or outputs, checked by DVC itself
            continue
        assert path.is_file(), f"{dep['path']} is gone; {AGAIN}"
        assert hashlib.md5(path.read_bytes()).hexdigest() == dep["md5"], f"{dep['path']} changed; {AGAIN}"


@pytest.mark.parametrize("stage", sorted(LOCK["stages"]))
def test_the_committed_lock_matches_params_yaml(stage):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    locked = LOCK["stages"][stage].get("params", {}).get("params.yaml", {})
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    assert sorted(locked) == sorted(dvc.get("params", [])), f"{stage}'s params list changed; {AGAIN}"
    assert {k: params[k] for k in locked} == locked, f"params.yaml changed; {AGAIN}"


def test_every_stage_is_locked():
    assert sorted(LOCK["stages"]) == sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
