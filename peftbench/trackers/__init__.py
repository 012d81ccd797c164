"""Experiment trackers: one registry (``TRACKERS``), one module per tracker (``tensorboard``,
``wandb``, ``mlflow``); docs/trackers.md. ``peftbench run --tracker tensorboard,mlflow``."""
from ._base import (
    TRACKERS,
    RunInfo,
    Tracker,
    TrackerHooks,
    TrackerRun,
    Tracking,
    check_sweep_name,
    check_tracking,
    hooks_for,
    register_tracker,
)

__all__ = ["TRACKERS", "Tracker", "TrackerRun", "TrackerHooks", "Tracking", "RunInfo", "check_tracking", "hooks_for",
           "register_tracker", "check_sweep_name"]
