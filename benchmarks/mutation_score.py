"""Mutation score per module, from the last `mutmut run` (its [tool.mutmut] section in pyproject.toml).

    pip install -e ".[test,mutation]" && mutmut run && python benchmarks/mutation_score.py

Prints killed / total per module and the surviving mutants by name (`mutmut show NAME` shows one).
A timeout counts as killed (the mutant made a test hang, so the suite caught it); "no tests" means
no selected test runs that code, so it counts as a survivor.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys


def main() -> None:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    for line in out.splitlines():
        match = re.match(r"\s*([\w.ǁ]+)__mutmut_\d+: (.+)$", line.strip())
        if not match:
            continue
        name, status = match.group(0).split(":")[0].strip(), match.group(2).strip()
        module = re.split(r"\.xǁ|\.x_", match.group(1))[0]
        per_module[module][status] += 1
        if status not in ("killed", "timeout"):
            survivors.append(f"{name}: {status}")
    total_killed = total = 0
    for (module, counts) in sorted(per_module.items()):
        killed, n = counts["killed"] + counts["timeout"], sum(counts.values())
        total_killed, total = total_killed + killed, total + n
        print(f"{module:24s} {killed:4d} / {n:4d}  {100 * killed / n:5.1f}%   {dict(counts)}")
    if total:
        print(f"{'all':24s} {total_killed:4d} / {total:4d}  {100 * total_killed / total:5.1f}%")
    if "-v" in sys.argv:
        print("\n".join(survivors))


if __name__ == "__main__":
    main()
