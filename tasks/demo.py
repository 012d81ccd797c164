"""The demo suite: small tasks that run offline anywhere, materialised on first use into the NOAH
layout (so the real VTAB loader is what reads them), with a tiny ViT pretrained on Fashion-MNIST.

Data root: ``$PEFTBENCH_DATA`` or ``~/.cache/peftbench/data`` → ``<root>/demo/<task>/``.
"""
from functools import partial

from peftbench.tasks import Suite, Task, register_suite, register_task

from ._demo_data import DEMO_TASKS, materialise

for name, info in DEMO_TASKS.items():
    # task names are global: the demo tasks carry a prefix (VTAB has a clevr_count too)
    register_task(Task(
        name=f"demo_{name}", suite="demo", num_classes=info["num_classes"], description=info["description"],
        group=info["group"], folder=name,
        split_sizes={"train800": 800, "val200": 200, "train800val200": 1000, "test": info["test_size"]},
        materialise=partial(materialise, name),
        how_to_get="The demo tasks build themselves; delete the folder to rebuild it."))

register_suite(Suite(
    name="demo", description="offline demo: digits, animal silhouettes, dSprites-like and CLEVR-like tasks",
    tasks=tuple(f"demo_{name}" for name in DEMO_TASKS), protocol="demo", backbone="demo-vit", folder="demo",
    default_data_root="~/.cache/peftbench/data", groups=("natural", "structured")))
