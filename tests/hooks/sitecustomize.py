"""Test-only fault injection, loaded by Python at start-up when tests put this folder on PYTHONPATH.

Nothing here is in the product; each hook acts only in a `mixer` process and only when its
variable is set:

- MIXER_TEST_PAUSE_IN_WRITE=<marker>: each `last.pt` is written to its temporary name, the marker
  file is created, and the process waits (60 s) before renaming: a test that sees the marker kills
  the process in the middle of a checkpoint write.
- MIXER_TEST_HOLD_STAGING=<folder>: once the command holds its locks and has made its first
  staging folder, it creates <folder>/held and waits until <folder>/release exists, so a test can
  start a second writer while the first is certainly at work.
"""

import os
import sys

if os.path.basename(sys.argv[0]) == "mixer" and os.environ.get("MIXER_TEST_PAUSE_IN_WRITE"):
    import time
    from pathlib import Path

    import mixer.train_state as train_state

    _atomic_write = train_state.atomic_write

    def _pausing_atomic_write(path, write):
        def write_then_wait(tmp):
            write(tmp)
            if Path(path).name == train_state.LAST:
                Path(os.environ["MIXER_TEST_PAUSE_IN_WRITE"]).write_text(str(tmp))
                time.sleep(60)

        _atomic_write(path, write_then_wait)

    train_state.atomic_write = _pausing_atomic_write

if os.path.basename(sys.argv[0]) == "mixer" and os.environ.get("MIXER_TEST_HOLD_STAGING"):
    import time
    from pathlib import Path

    import pipeline.outputs as outputs

    _dir = outputs.Staging.dir

    def _holding_dir(self, target):
        made = _dir(self, target)
        folder = Path(os.environ["MIXER_TEST_HOLD_STAGING"])
        if not (folder / "held").exists():
            (folder / "held").write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return made

    outputs.Staging.dir = _holding_dir
