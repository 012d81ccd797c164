"""Summarise SPT's released supervised masks into methods/spt/released_masks.json.

The official repository (ziplab/SPT @ e385f67) ships the sensitivity stage's output for the 19 VTAB tasks,
``sensitivity_spt_supervised_{lora,adapter}_a10/<task>/param_req_<budget>.pth``. This keeps, per mask, what
decides the model's shape and parameter count (no indices): the budget value it records (``params``, M),
the structurally tuned matrices, the fully tuned vectors and the number of unstructured entries of every
tensor. ``spt-lora`` / ``spt-adapter`` with ``selection=released:<task>@<budget>`` build that shape (for
``peftbench params`` and ``peftbench bench``; training always computes its own selection).

    git clone https://github.com/ziplab/SPT && python scripts/spt_released_masks.py SPT

The .pth files are read with ``torch.load(weights_only=True)`` and an allow-list of the two numpy
globals they contain (no code is unpickled).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from numpy._core import multiarray

TASKS = {"cifar": "cifar100", "clevr_dist": "clevr_distance", "kitti": "kitti_distance",
         "dsprites_loc": "dsprites_location", "dsprites_ori": "dsprites_orientation",
         "smallnorb_azi": "smallnorb_azimuth", "smallnorb_ele": "smallnorb_elevation"}
OPS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")
BUDGETS = ("0.2", "0.4", "0.6", "0.8")  # the budgets the authors choose from on validation data (ziplab/SPT#1)
SAFE = [(multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]


def tensors(depth: int = 12) -> list[str]:
    """SPT's candidate tensors in its model's parameter order (separate q/k/v), the index space of the summary."""
    out = []
    for i in range(depth):
        b = f"blocks.{i}"
        out += [f"{b}.norm1.weight", f"{b}.norm1.bias"]
        for op in ("attn.q", "attn.k", "attn.v", "attn.proj"):
            out += [f"{b}.{op}.weight", f"{b}.{op}.bias"]
        out += [f"{b}.norm2.weight", f"{b}.norm2.bias"]
        for op in ("mlp.fc1", "mlp.fc2"):
            out += [f"{b}.{op}.weight", f"{b}.{op}.bias"]
    return out + ["norm.weight", "norm.bias"]


NAMES = tensors()
POS = {n: i for i, n in enumerate(NAMES)}


def summarise(path: Path) -> dict:
    with torch.serialization.safe_globals(SAFE):
        d = torch.load(path, weights_only=True, map_location="cpu")
    sizes = [int(v) for v in d["unstructured_name_shapes_int"].values()]
    idx = d["unstructured_indexes"]
    edges = np.cumsum([0] + sizes)
    counts = np.histogram(idx.numpy(), bins=edges)[0] if len(idx) else np.zeros(len(sizes), dtype=int)
    per_tensor = [0] * len(NAMES)
    for k, c in zip(d["unstructured_name_shapes_int"], counts):
        per_tensor[POS[k]] = int(c)
    # s: 12 x 6 flags (q, k, v, proj, fc1, fc2 of every block); v: positions of the fully tuned vectors in
    # "tensors"; u: unstructured entries per tensor of "tensors"
    return {"params": round(float(d["params"]), 6),
            "s": "".join(str(int(f)) for row in d["tuned_matrices"] for f in row),
            "v": sorted(POS[k] for k in d["tuned_vectors"]), "u": per_tensor}


def main(repo: str, out: str = "methods/spt/released_masks.json") -> int:
    data = {"source": "ziplab/SPT @ e385f67, sensitivity_spt_supervised_{lora,adapter}_a10/<task>/param_req_<B>.pth "
                      "(summarised by scripts/spt_released_masks.py)", "ops": list(OPS), "tensors": NAMES, "masks": {}}
    for kind in ("lora", "adapter"):
        root = Path(repo) / f"sensitivity_spt_supervised_{kind}_a10"
        for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            task = TASKS.get(task_dir.name, task_dir.name)
            for b in BUDGETS:
                f = task_dir / f"param_req_{b}.pth"
                if f.is_file():
                    data["masks"][f"{kind}:{task}@{b}"] = summarise(f)
    Path(out).write_text(json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(data['masks'])} masks -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
