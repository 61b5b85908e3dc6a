"""Test-only fault injection, loaded by Python at start-up when tests put this folder on PYTHONPATH.

With MIXER_TEST_PAUSE_IN_WRITE=<marker path> set, a `mixer` process writes each `last.pt` to its
temporary name, creates the marker file, and then waits (60 s) before renaming: a test that sees
the marker kills the process in the middle of a checkpoint write. Nothing here is in the product.
"""

import os
import sys

if os.environ.get("MIXER_TEST_PAUSE_IN_WRITE") and os.path.basename(sys.argv[0]) == "mixer":
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
