"""Test helpers: a tiny NOAH-layout task suite and a tiny backbone preset, registered once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from peftbench.backbones import BACKBONES, Preset, register_backbone
from peftbench.tasks import SUITES, TASKS, Suite, Task, register_suite, register_task

TINY_BACKBONE = "test-tiny-vit"
SIZES = {"train800": 48, "val200": 16, "train800val200": 64, "test": 32}


def write_noah_task(task_dir: Path, num_classes: int = 3, sizes: dict = SIZES, seed: int = 0) -> Path:
    """A learnable toy task in NOAH's layout: the class is the colour of a square at a fixed place."""
    rng = np.random.default_rng(seed)
    task_dir = Path(task_dir)
    lines = {}
    for split in ("train800", "val200", "test"):
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(sizes[split]):
            y = i % num_classes
            img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            img[8:24, 8:24, y % 3] = 220
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(img).save(task_dir / rel)
            rows.append(f"{rel} {y}")
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task_dir / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return task_dir


def ensure_registered() -> None:
    if TINY_BACKBONE not in BACKBONES:
        register_backbone(TINY_BACKBONE, Preset("vit_tiny_patch16_224",
                                                dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
                                                None, "test-only tiny ViT"))
    if "testsuite" not in SUITES:
        register_suite(Suite(name="testsuite", description="tests", tasks=("toy", "toy_b"), protocol="vpt",
                             backbone=TINY_BACKBONE, folder="testsuite"))
    from peftbench.sweep.paper import add_card, recipes

    if ("linear", "testsuite") not in recipes():  # the tests' paper recipe (--protocol paper on the toy suite)
        add_card(Path(__file__).with_name("papers") / "testsuite.toml")
    if "toy" not in TASKS:
        for name in ("toy", "toy_b"):
            register_task(Task(name=name, suite="testsuite", num_classes=3, description="toy colour task",
                               group="natural" if name == "toy" else "structured",
                               how_to_get="(test data)"))


def make_data_root(root: Path) -> Path:
    ensure_registered()
    for name in ("toy", "toy_b"):
        if not (root / "testsuite" / name / "test.txt").exists():
            write_noah_task(root / "testsuite" / name, seed=1 if name == "toy" else 2)
    return root


def tiny_backbone_2x32() -> str:
    """A registered random ViT of 2 blocks, width 32, on 32-pixel images (patch 8): its name."""
    name = "test-tiny-vit-2x32"
    if name not in BACKBONES:
        register_backbone(name, Preset("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                                    num_heads=2), None, "random tiny ViT for tests"))
    return name


def plan_contexts(method: str, task: str, protocol: str = "vpt", sets=()) -> list:
    """The planning context of one method x task under a protocol (no data, no store): what a pipeline
    test dry-runs through ``peftbench.sweep.drive.count_runs``. ``sets``: ``OPTION=VALUE`` strings."""
    from peftbench.methods import get_method
    from peftbench.sweep.protocols import PlanContext, get_protocol
    from peftbench.tasks import get_suite, get_task

    m, t, proto = get_method(method), get_task(task), get_protocol(protocol)
    opts, sources = m.resolve_options(m.parse_options(dict(s.split("=", 1) for s in sets)), t)
    return [proto.adapt(PlanContext(method=m, task=t, suite=get_suite(t.suite), protocol=proto, options=opts,
                                    option_sources=sources, config=method, seeds=proto.default_seeds,
                                    backbone="demo-vit", checkpoint=None, checkpoint_id=None, data_root="/nonexistent",
                                    fingerprint=None))]
