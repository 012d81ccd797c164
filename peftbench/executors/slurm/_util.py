"""Small helpers shared by the SLURM modules."""
from __future__ import annotations

import time


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
