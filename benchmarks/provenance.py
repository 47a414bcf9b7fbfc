"""Where and when a benchmark ran: CPU or card, date, commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any


def provenance() -> dict[str, Any]:
    """Where and when: CPU or card, date, commit (``MOAPLAN_COMMIT`` overrides git, for copies
    of the tree that travel without their history, e.g. to a lent GPU machine)."""
    import torch

    commit = os.environ.get("MOAPLAN_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                          text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}
