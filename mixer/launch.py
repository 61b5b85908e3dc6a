"""Which process this is: the one home of "the main process" for the library and the pipeline alike.

A launcher (torchrun, `accelerate launch`, a cluster's) starts several processes and tells each its
place through the environment: WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous
address (MASTER_ADDR, MASTER_PORT), which torch.distributed and so Accelerate read too. Reading them
here, checked, means the pipeline (which process writes the outputs) and the engine (which process
checkpoints, through Accelerate) cannot disagree:

- no WORLD_SIZE, or 1: one process, the main one; a stray RANK or LOCAL_RANK (which would make it a
  follower that writes nothing, or Accelerate wait for a process group) is one line naming it;
- WORLD_SIZE > 1 without a launcher's other variables: one line saying so, not Accelerate's
  traceback nor a wait for processes that will never come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from mixer.errors import MixerError

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Processes:
    """This process's place among those launched together."""

    rank: int = 0
    world: int = 1
    local_world: int = 1   # the processes on this machine (they share its memory)
    local_rank: int = 0    # this process's place on its machine (its GPU)

    @property
    def main(self) -> bool:
        """The process that writes the outputs and prints: rank 0."""
        return self.rank == 0


def _number(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    if name not in env:
        return default
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise MixerError(f"environment variable {name}={text[:40]!r} must be an integer of at least {low}; "
                         "unset it, or let a launcher (torchrun, accelerate launch) set it")
    return value


def processes(env: Mapping[str, str] | None = None) -> Processes:
    """This process's place, from the launcher's environment variables (checked; see the module)."""
    env = os.environ if env is None else env
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # set but empty: Accelerate's int('')
        if name in env and not env[name].strip():
            raise MixerError(f"environment variable {name} is set but empty; unset it (or let a launcher set it)")
    world = _number(env, "WORLD_SIZE", 1, 1)
    missing = [v for v in LAUNCHER_VARIABLES if not env.get(v, "").strip()]
    if world == 1 and missing:  # a stray rank would make this process a follower (or Accelerate wait for a group)
        unset = {"RANK": ("", "0"), "LOCAL_RANK": ("", "-1")}  # Accelerate takes any LOCAL_RANK for a launch
        stray = [v for (v, off) in unset.items() if env.get(v, "").strip() not in off]
        if stray:
            raise MixerError(f"{' and '.join(f'{v}={env[v].strip()[:20]}' for v in stray)} set, but WORLD_SIZE is "
                             f"not above 1: unset {' and '.join(stray)} to run one process (a launcher such as "
                             "torchrun sets them all)")
        return Processes()
    if missing:
        raise MixerError(f"WORLD_SIZE={world} is set but this process was not started by a launcher (no "
                         f"{', '.join(missing)}): unset WORLD_SIZE to run one process, or start the command with "
                         f"`torchrun --nproc_per_node {world}` or `accelerate launch`")
    rank = _number(env, "RANK", 0, 0)
    if rank >= world:
        raise MixerError(f"RANK={rank} is not below WORLD_SIZE={world}; let the launcher set both")
    local_world = _number(env, "LOCAL_WORLD_SIZE", world, 1)
    return Processes(rank, world, min(local_world, world), _number(env, "LOCAL_RANK", 0, 0))


def is_main() -> bool:
    """Whether this process prints and writes (rank 0, or the only one). Never raises: for error paths."""
    try:
        return processes().main
    except MixerError:
        return True
