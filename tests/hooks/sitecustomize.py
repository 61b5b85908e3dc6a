"""Test-only fault injection, loaded by Python at start-up when tests put this folder on PYTHONPATH.

Nothing here is in the product; each hook acts only in a `mixer` process and only when its
variable is set:

- MIXER_TEST_PAUSE_IN_WRITE=<marker>: each `last.pt` (in the run's folder, checkpoints/<output_dir>/<run>/)
  is written to its temporary name, the marker file is created, and the process waits (10 minutes, a
  failsafe) before renaming: a test that sees the marker kills the process in the middle of a
  checkpoint write. Every other file goes through unchanged.
- MIXER_TEST_HOLD_STAGING=<folder>: once the command holds its locks and has made its first
  staging folder, it creates <folder>/held and waits until <folder>/release exists, so a test can
  start a second writer while the first is certainly at work.
- MIXER_TEST_HOLD_AT_STEP=<step>:<folder>: when the training loop, after optimizer step <step>
  (inside an epoch), asks whether a checkpoint is due, the process creates <folder>/held-<RANK>
  and waits until <folder>/release exists; then the loop goes on to see whether it was asked to
  stop. A test signals a process at a known step, instead of hoping that its signal lands soon
  enough after a line it read.
- MIXER_TEST_CLOCK_TICK=<seconds>: the clock of the checkpoint timer (`--checkpoint-every 90s`)
  moves <seconds> forward each time it is read (once a step, and at each checkpoint), so a time
  cadence is met after a known number of steps, however fast the machine.

Each wait has a long failsafe deadline (5 or 10 minutes) that no passing test reaches.
"""

import os
import sys

if os.path.basename(sys.argv[0]) == "mixer" and os.environ.get("MIXER_TEST_PAUSE_IN_WRITE"):
    import time
    from pathlib import Path

    import mixer.train_state as train_state

    _atomic_write = train_state.atomic_write

    def _pausing_atomic_write(path, content, *args, **kwargs):
        if Path(path).name != train_state.LAST:  # the run's other files (fingerprint.json) as they are
            return _atomic_write(path, content, *args, **kwargs)

        def write_then_wait(tmp):
            content(tmp)
            Path(os.environ["MIXER_TEST_PAUSE_IN_WRITE"]).write_text(str(tmp))
            time.sleep(600)  # a failsafe: the test kills the process once it sees the marker

        return _atomic_write(path, write_then_wait, *args, **kwargs)

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
            deadline = time.monotonic() + 600
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return made

    outputs.Staging.dir = _holding_dir

if os.path.basename(sys.argv[0]) == "mixer" and os.environ.get("MIXER_TEST_HOLD_AT_STEP"):
    import time
    from pathlib import Path

    import mixer.train_state as train_state

    _step, _, _folder = os.environ["MIXER_TEST_HOLD_AT_STEP"].partition(":")
    _due = train_state.CheckpointTimer.due

    def _holding_due(self, step):
        folder = Path(_folder)
        if step == int(_step):
            (folder / f"held-{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300  # inside pytest's 600 s: a test whose release never comes fails
            # with the process's output rather than a timeout
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return _due(self, step)

    train_state.CheckpointTimer.due = _holding_due

if os.path.basename(sys.argv[0]) == "mixer" and os.environ.get("MIXER_TEST_CLOCK_TICK"):
    import mixer.train_state as train_state

    _tick, _readings = float(os.environ["MIXER_TEST_CLOCK_TICK"]), [0]
    _init = train_state.CheckpointTimer.__init__

    def _ticking_clock():
        _readings[0] += 1
        return _readings[0] * _tick

    def _init_with_ticking_clock(self, every, step, clock=None):
        _init(self, every, step, _ticking_clock)

    train_state.CheckpointTimer.__init__ = _init_with_ticking_clock
