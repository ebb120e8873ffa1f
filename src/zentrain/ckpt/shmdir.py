"""Who owns an agent's (or zygote's) tmpfs directory: a pid plus the process's kernel start
time, so a directory left by a SIGKILLed process is recognised even after its pid is
reused, and removed by the next one to start."""

from __future__ import annotations

import shutil
from pathlib import Path

OWNER_FILE = "owner"


def owner_id(pid: int) -> str:
    """pid and kernel start time: identifies a process even after its pid is reused."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid} {start}"


def sweep_stale(shm_root: str) -> list[str]:
    """Remove agent directories whose agent is gone without cleaning up (SIGKILLed with
    its whole process group, say); returns what was removed."""
    removed = []
    for d in Path(shm_root).glob("zentrain-*-node*"):
        try:
            owner = (d / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # not ours, or still starting
        pid = int(owner.split()[0]) if owner.split()[0].isdigit() else -1
        if pid > 0 and owner_id(pid) == owner:
            continue  # alive
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed
