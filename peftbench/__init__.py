"""peftbench: a benchmark harness for parameter-efficient fine-tuning of Vision Transformers.

The package reads like the data flow of a sweep (docs/architecture.md)::

    cli → api → sweep (plan, protocols, drive) → executors → trackers → train → store → results

with the plugin registries beside it: ``methods/`` (one file per method), ``tasks/`` (suites),
``data/layouts`` and ``data/transforms``, ``sweep/protocols``, ``executors/``, ``trackers/``,
``results/columns``.

The Python API (docs/api.md) is importable from here; its names load on first use, so that
``import peftbench`` stays fast (no torch until a function needs it)::

    import peftbench as pb
    result = pb.run_sweep(pb.Sweep(methods=["linear", "vpt"], suite="demo", search={"epochs": 2}))
    df = pb.load_runs("runs")                    # one row per run
    board = pb.leaderboard(df[df.task != "demo_digits"], suite="demo")
    model = pb.build_model("lora", num_classes=10, backbone="vit_base_patch16_224.orig_in21k")
    pb.publish("runs", method="lora", task="demo_digits", seed=42)  # a hub folder; pb.load_pretrained(folder)
"""
from ._version import __version__

_API = ("Sweep", "Plan", "SweepResult", "load_sweep", "plan_sweep", "run_sweep", "load_runs", "leaderboard",
        "status", "build_model", "load_pretrained", "publish")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'peftbench' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
