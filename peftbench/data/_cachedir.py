"""Where peftbench keeps its disk caches: ``$PEFTBENCH_CACHE`` or ``~/.cache/peftbench``.

    <cache>/decoded/    decoded-image memory maps (peftbench.data.cache)
    <cache>/verified/   stamps of clean `peftbench data verify` results (peftbench.data.verify)

``PEFTBENCH_CACHE=off`` (or 0/none/false/no) turns both off. Deleting the folder is always safe.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_base() -> Path | None:
    env = os.environ.get("PEFTBENCH_CACHE", "").strip()
    if env.lower() in ("off", "0", "none", "false", "no"):
        return None
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "peftbench"
