#!/usr/bin/env python
"""Check that the pretrained demo backbone transfers: linear probe vs a random ViT.

For each demo task (tasks/_demo_data.py) this extracts frozen features (CLS token
after the final norm) on train800val200 and test for
  (a) the pretrained backbone peftbench/assets/demo_vit.safetensors, and
  (b) the same architecture randomly initialised (timm default init, seed 0),
fits a logistic regression (max_iter 2000) on standardised features and prints
the test accuracy of both.

Usage:
  HF_HUB_OFFLINE=1 python scripts/check_demo_transfer.py [--tasks digits animals ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def _load_demo_data():
    """Import tasks/_demo_data.py by path (it is standalone: no peftbench import)."""
    spec = importlib.util.spec_from_file_location("demo_data", REPO / "tasks" / "_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def create_backbone(meta: dict) -> torch.nn.Module:
    kwargs = dict(meta["timm_create_model"])
    return timm.create_model(kwargs.pop("model_name"), **kwargs)


def read_split(task_dir: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images of a NOAH split file as a normalised (N,3,32,32) tensor, and labels."""
    paths, labels = [], []
    for line in (task_dir / f"{split}.txt").read_text().splitlines():
        rel, lab = line.rsplit(" ", 1)
        paths.append(rel)
        labels.append(int(lab))
    x = np.stack([np.asarray(Image.open(task_dir / p).convert("RGB")) for p in paths])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return (x - IMAGENET_MEAN) / IMAGENET_STD, np.array(labels)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def probe(f_train, y_train, f_test, y_test) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(f_train, y_train)
    return float(clf.score(f_test, y_test))


def main(argv=None) -> int:
    dd = _load_demo_data()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=REPO / "peftbench" / "assets" / "demo_vit.safetensors")
    p.add_argument("--data-dir", type=Path, default=REPO / ".cache" / "demo_data", help="where the demo tasks are materialised")
    p.add_argument("--seed", type=int, default=0, help="demo data seed")
    p.add_argument("--tasks", nargs="+", default=list(dd.DEMO_TASKS), choices=list(dd.DEMO_TASKS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    meta = json.loads(args.weights.with_suffix(".json").read_text())
    pretrained = create_backbone(meta)
    pretrained.load_state_dict(load_file(str(args.weights)), strict=True)
    torch.manual_seed(0)
    random_init = create_backbone(meta)

    results = {}
    print(f"{'task':<14}{'group':<12}{'classes':>8}{'pretrained':>12}{'random':>9}{'delta':>8}")
    for task in args.tasks:
        t0 = time.time()
        task_dir = args.data_dir / f"seed{args.seed}" / task
        dd.materialise(task, task_dir, seed=args.seed)
        x_tr, y_tr = read_split(task_dir, "train800val200")
        x_te, y_te = read_split(task_dir, "test")
        acc = {}
        for name, model in (("pretrained", pretrained), ("random", random_init)):
            acc[name] = probe(features(model, x_tr), y_tr, features(model, x_te), y_te)
        info = dd.DEMO_TASKS[task]
        results[task] = acc
        print(
            f"{task:<14}{info['group']:<12}{info['num_classes']:>8}{acc['pretrained']:>12.3f}{acc['random']:>9.3f}"
            f"{acc['pretrained'] - acc['random']:>+8.3f}   ({time.time() - t0:.0f}s)",
            flush=True,
        )
    mean_p = np.mean([r["pretrained"] for r in results.values()])
    mean_r = np.mean([r["random"] for r in results.values()])
    print(f"{'mean':<34}{mean_p:>12.3f}{mean_r:>9.3f}{mean_p - mean_r:>+8.3f}")
    wins = sum(r["pretrained"] > r["random"] for r in results.values())
    print(f"pretrained beats random on {wins}/{len(results)} tasks")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
