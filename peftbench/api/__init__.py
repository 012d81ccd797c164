"""The Python API (docs/api.md): plan and run sweeps from a notebook, read the run store as pandas
DataFrames, build a method's model for your own loop. ``peftbench run`` is a command line over it.

Stable names (also importable from ``peftbench`` itself)::

    Sweep, load_sweep, plan_sweep, run_sweep, Plan, SweepResult    # sweep.py, sweepfile.py
    load_runs, leaderboard, status                                   # runs.py
    build_model, load_pretrained, publish                            # models.py
"""
from .models import build_model, load_pretrained, publish
from .runs import leaderboard, load_runs, status
from .sweep import Plan, SweepResult, check_device, check_runs_dir, plan_sweep, run_sweep, write_resolved
from .sweepfile import Sweep, dump_sweep, load_sweep

__all__ = ["Sweep", "Plan", "SweepResult", "load_sweep", "dump_sweep", "plan_sweep", "run_sweep", "load_runs",
           "leaderboard", "status", "build_model", "load_pretrained", "publish", "check_device", "check_runs_dir",
           "write_resolved"]
