"""Helpers both shoal benchmark harnesses use: loading the team's shared peer
harness (../shared/bench) and running a command for a version string."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def import_shared(path: str):
    """Imports pb_common, pb_workloads and pb_report from `path`; returns them.

    shoal keeps its state in <root>/.shoal, which is not part of the synced
    tree, so tree comparisons skip it."""
    p = Path(path).resolve()
    if not (p / "pb_workloads.py").is_file():
        sys.exit(f"shared bench modules not found in {p} (use --shared)")
    sys.path.insert(0, str(p))
    import pb_common
    import pb_report
    import pb_workloads
    pb_workloads.IGNORE_TOP = set(pb_workloads.IGNORE_TOP) | {".shoal"}
    return pb_common, pb_workloads, pb_report


def sh(cmd: list[str], timeout: float = 30) -> str:
    """A command's output, or why it could not run (for the facts header)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
