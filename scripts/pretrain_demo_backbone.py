#!/usr/bin/env python
"""Pretrain the tiny demo ViT backbone on Fashion-MNIST (CPU, ~20 min on 2 cores).

The demo backbone lets the harness run end to end offline with a backbone whose
features are genuinely pretrained (not random).  The architecture is a tiny timm
ViT created with exactly ``TIMM_ARGS`` below; its features are the CLS token
after the final norm (dim 96).

Data: Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``), read from the raw idx files.  Preprocessing equals what
the harness does downstream for the demo tasks: grayscale replicated to RGB,
resized 28->32 with PIL bilinear, pixel/255, ImageNet mean/std normalisation.

Training is supervised with a temporary linear head (96->10) that is NOT saved,
with augmentation chosen so that the features transfer to the demo tasks
(tasks/_demo_data.py): small random affine (shift/rotation/scale, no flips),
random per-channel tint of the object (so that the RGB patch embedding does not
only ever see grey inputs), random grey backgrounds, mild contrast/brightness
jitter and occasional inversion.  The forward pass runs under bfloat16 autocast
by default (~15% faster on CPUs with AVX512-BF16; ``--no-bf16`` for float32).

Outputs (``--out``, default ``peftbench/assets/``):
  demo_vit.safetensors  backbone state_dict only (float32, timm keys, num_classes=0)
  demo_vit.json         provenance (arguments, command, data sha256s, accuracy, ...)

Usage:
  HF_HUB_OFFLINE=1 python scripts/pretrain_demo_backbone.py --epochs 10 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# The exact timm.create_model call of the demo backbone (recorded in the json).
TIMM_MODEL = "vit_tiny_patch16_224"
TIMM_ARGS = dict(
    pretrained=False,
    img_size=32,
    patch_size=4,
    embed_dim=96,
    depth=6,
    num_heads=3,
    num_classes=0,
    global_pool="token",
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_SIZE = 32


def create_backbone() -> torch.nn.Module:
    return timm.create_model(TIMM_MODEL, **TIMM_ARGS)


# ----------------------------------------------------------------------------- data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd idx file (the MNIST format): big-endian magic + dims + uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 idx file")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(tuple(int(d) for d in dims))


def resize_32(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> 32x32 uint8 with PIL bilinear, the same op the demo tasks use."""
    out = np.empty((len(images), IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR))
    return out


def load_fashion_mnist(data_dir: Path):
    missing = [n for n in FMNIST_FILES.values() if not (data_dir / n).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST files missing in {data_dir}: {missing}. "
            "Install them with `apt-get install dataset-fashion-mnist`."
        )
    arrays = {k: read_idx(data_dir / n) for k, n in FMNIST_FILES.items()}
    x_train, x_test = resize_32(arrays["train_images"]), resize_32(arrays["test_images"])
    y_train = arrays["train_labels"].astype(np.int64)
    y_test = arrays["test_labels"].astype(np.int64)
    sha = {n: sha256_file(data_dir / n) for n in FMNIST_FILES.values()}
    return x_train, y_train, x_test, y_test, sha


def normalise(x01: torch.Tensor) -> torch.Tensor:
    """(B,1|3,H,W) in [0,1] -> replicated to RGB, ImageNet-normalised."""
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


# ----------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batched augmentation of grayscale images in [0,1], (B,1,32,32) -> (B,3,32,32).

    Everything is done on the whole batch (one affine_grid/grid_sample), so it costs
    a few percent of a training step.  No horizontal flips: they would teach the
    features mirror invariance, which hurts orientation tasks (dsprites_ori).
    """
    b = x.shape[0]

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, generator=g) * (hi - lo) + lo

    def coin(p):
        return (torch.rand(b, 1, 1, 1, generator=g) < p).float()

    # Random affine: rotation +-12 deg, isotropic scale 0.85-1.15, shift +-3 px.  Small
    # angles/shifts keep orientation and position information usable downstream.
    ang = u(-12, 12) * math.pi / 180
    scale = u(0.85, 1.15)
    shift = u(-3, 3, 2) * (2.0 / IMG_SIZE)  # pixels -> normalised coords
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    alpha = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Colour: treat the grey image as the object's alpha.  With p=0.4 the object gets a
    # random per-channel tint, with p=0.3 it is composited over a random grey
    # background (the clevr-like demo task is coloured objects on grey).
    tint = coin(0.4)
    fg = alpha * (tint * u(0.3, 1.0, 3, 1, 1) + (1 - tint))
    img = fg + (1 - alpha) * coin(0.3) * u(0.25, 0.6, 1, 1, 1)
    # Mild contrast/brightness jitter, then inversion (dark object on light) with p=0.1.
    img = (img * u(0.8, 1.1, 1, 1, 1) + u(-0.05, 0.05, 1, 1, 1)).clamp(0, 1)
    inv = coin(0.1)
    return inv * (1 - img) + (1 - inv) * img


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(backbone, head, x_u8: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    backbone.eval()
    head.eval()
    correct = 0
    for i in range(0, len(x_u8), batch):
        xb = torch.from_numpy(x_u8[i : i + batch]).float().div_(255).unsqueeze(1)
        pred = head(backbone(normalise(xb))).argmax(1).numpy()
        correct += int((pred == y[i : i + batch]).sum())
    return correct / len(x_u8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="passes over the 60k training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("peftbench/assets"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the forward pass (~15%% faster on CPUs with AVX512-BF16); weights stay float32",
    )
    p.add_argument("--data-dir", type=Path, default=FMNIST_DIR)
    p.add_argument("--limit-train", type=int, default=0, help="debug: use only the first N training images")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator().manual_seed(args.seed)

    t0 = time.time()
    x_train, y_train, x_test, y_test, data_sha = load_fashion_mnist(args.data_dir)
    if args.limit_train:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    print(f"data: train {x_train.shape} test {x_test.shape} ({time.time() - t0:.1f}s)", flush=True)

    backbone = create_backbone()
    head = torch.nn.Linear(backbone.num_features, 10)  # temporary, not saved
    params = list(backbone.parameters()) + list(head.parameters())
    # No weight decay on biases, norms, cls token and position embedding.
    decay = [q for q in params if q.ndim >= 2 and q.shape[:2] != (1, 1)]
    no_decay = [q for q in params if not (q.ndim >= 2 and q.shape[:2] != (1, 1))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 0
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    x_train_t = torch.from_numpy(x_train)
    y_train_t = torch.from_numpy(y_train)
    step = 0
    t_train = time.time()
    for epoch in range(args.epochs):
        backbone.train()
        head.train()
        perm = torch.randperm(len(x_train), generator=g)
        loss_sum, correct, seen = 0.0, 0, 0
        t_ep = time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = x_train_t[idx].float().div_(255).unsqueeze(1)
            yb = y_train_t[idx]
            xb = augment(xb, g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = head(backbone(normalise(xb))).float()
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            if i % 50 == 0:
                rate = seen / max(1e-6, time.time() - t_ep)
                print(f"  epoch {epoch + 1} step {i}/{steps_per_epoch} loss {loss.item():.3f} ({rate:.0f} img/s)", flush=True)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f} "
            f"({time.time() - t_ep:.0f}s, total {time.time() - t_train:.0f}s)",
            flush=True,
        )
    train_seconds = time.time() - t_train
    test_acc = evaluate(backbone, head, x_test, y_test)
    print(f"Fashion-MNIST test accuracy (temporary linear head): {test_acc:.4f}", flush=True)

    # ---- save backbone only (the head is discarded)
    args.out.mkdir(parents=True, exist_ok=True)
    st_path = args.out / "demo_vit.safetensors"
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in backbone.state_dict().items()}
    # A single metadata key: safetensors writes a multi-key metadata dict in hash order,
    # which would make the file bytes differ from run to run.
    save_file(state, str(st_path), metadata={"format": "pt"})
    os.chmod(st_path, 0o644)  # safetensors may create it 0600; it is a shared, committed asset
    cmd_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    provenance = {
        "description": ("Tiny ViT demo backbone pretrained supervised on Fashion-MNIST; features = CLS token after "
                        "final norm (dim 96)."),
        "timm_create_model": {"model_name": TIMM_MODEL, **TIMM_ARGS},
        "feature_dim": backbone.num_features,
        "num_params": sum(v.numel() for v in state.values()),
        "command": shlex.join(["python", "scripts/pretrain_demo_backbone.py", *cmd_args]),
        "seed": args.seed,
        "epochs": args.epochs,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": f"linear warmup {args.warmup_epochs} epochs, cosine to 0, per step",
            "label_smoothing": args.label_smoothing,
            "grad_clip_norm": 1.0,
            "augmentation": "affine (rot +-12deg, scale 0.85-1.15, shift +-3px), no flips; per-channel "
            "object tint 0.3-1.0 p=0.4; grey background 0.25-0.6 p=0.3; contrast 0.8-1.1, brightness +-0.05; "
            "inversion p=0.1",
            "precision": "bfloat16 autocast" if args.bf16 else "float32",
            "threads": args.threads,
            "limit_train": args.limit_train or None,
        },
        "preprocessing": {
            "input": "grayscale replicated to 3 channels, resized 28->32 with PIL bilinear, pixel/255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "img_size": IMG_SIZE,
        },
        "data": {
            "source": "Debian package dataset-fashion-mnist",
            "dir": str(args.data_dir),
            "sha256": data_sha,
            "train_images": int(len(x_train)),
            "test_images": int(len(x_test)),
        },
        "fashion_mnist_test_accuracy": round(test_acc, 4),
        "train_seconds": round(train_seconds, 1),
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "safetensors_sha256": sha256_file(st_path),
    }
    (args.out / "demo_vit.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {st_path} and {args.out / 'demo_vit.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
