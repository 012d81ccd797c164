"""Numerical checks of the accelerator paths (run by scripts/gpu_check.sh; also on the CPU in CI).

* ``precision``: bf16 (and fp16 on CUDA) autocast logits of e2vpt and vpt-deep against fp32 logits of the
  same model on the same batch. Tolerance: relative L2 error ||low - fp32|| / ||fp32|| <= 2e-2 (bf16
  keeps 8 significant bits, ~4e-3 relative per rounding; 12 blocks of rounded matmuls and softmaxes
  stay well inside 2e-2 on ViT-B/16) and the same top-1 class for >= 90 % of the images of a random
  batch (random-weight logits are often nearly tied, so exact agreement is not expected).
* ``sdpa``: every attention module on its fused path (``F.scaled_dot_product_attention``: flash /
  memory-efficient kernels on CUDA) against timm's explicit path (``fused_attn = False``: softmax(q
  k^T / sqrt(d)) v), in fp32, for the plain ViT, vpt-deep and e2vpt (whose key-value prompt attention
  follows the same switch). Tolerance: max |difference| <= 1e-4 x max(1, max |logit|).

Writes one JSON document (``--out``) and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from peftbench.backbones import create_backbone, image_size
from peftbench.methods import get_method
from peftbench.sweep.plan import parse_sets
from peftbench.train.loop import autocast

REL_L2 = 2e-2
TOP1_AGREEMENT = 0.9
SDPA_TOL = 1e-4


def build(method_name: str, backbone: str, sets: list[str], device: torch.device, num_classes: int = 100):
    method = get_method(method_name)
    opts = method.parse_options(parse_sets(list(sets), [method], strict=False)[method.name])
    opts, _ = method.resolve_options(opts, None)
    torch.manual_seed(0)
    model = method.build(create_backbone(backbone, pretrained=False), num_classes, opts)
    return model.to(device).eval()


def _batch(model, batch: int, device: torch.device) -> torch.Tensor:
    size = image_size(model.backbone)
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


@torch.no_grad()
def check_precision(device: torch.device, backbone: str, batch: int, sets: list[str],
                    methods=("e2vpt", "vpt-deep")) -> list[dict]:
    out = []
    precisions = ["bf16"] + (["fp16"] if device.type == "cuda" else [])
    for name in methods:
        model = build(name, backbone, sets, device)
        x = _batch(model, batch, device)
        ref = model(x).float()
        for precision in precisions:
            with autocast(device, precision):
                low = model(x).float()
            rel = float((low - ref).norm() / ref.norm())
            agree = float((low.argmax(-1) == ref.argmax(-1)).float().mean())
            out.append({"check": "precision", "method": name, "precision": precision, "rel_l2": rel,
                        "top1_agreement": agree, "max_abs_diff": float((low - ref).abs().max()),
                        "ok": rel <= REL_L2 and agree >= TOP1_AGREEMENT,
                        "tolerance": f"rel_l2 <= {REL_L2:g}, top-1 agreement >= {TOP1_AGREEMENT:g}"})
    return out


def _set_fused(model: torch.nn.Module, fused: bool) -> int:
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
            n += 1
    return n


@torch.no_grad()
def check_sdpa(device: torch.device, backbone: str, batch: int, sets: list[str],
               methods=("linear", "vpt-deep", "e2vpt")) -> list[dict]:
    out = []
    for name in methods:
        model = build(name, backbone, sets, device)
        x = _batch(model, batch, device)
        with autocast(device, "fp32"):
            n = _set_fused(model, True)
            fused = model(x)
            _set_fused(model, False)
            explicit = model(x)
        _set_fused(model, True)
        diff = float((fused - explicit).abs().max())
        tol = SDPA_TOL * max(1.0, float(explicit.abs().max()))
        out.append({"check": "sdpa", "method": name, "attention_modules": n, "max_abs_diff": diff,
                    "tolerance": tol, "ok": n > 0 and diff <= tol})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD.]OPTION=VALUE")
    p.add_argument("--out", default=None, help="JSON file of the results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = (check_precision(device, args.backbone, args.batch_size, args.sets)
               + check_sdpa(device, args.backbone, args.batch_size, args.sets))
    from peftbench.provenance import device_name

    doc = {"device": device_name(device), "backbone": args.backbone, "batch_size": args.batch_size,
           "torch": torch.__version__, "results": results}
    for r in results:
        what = r.get("precision") or "fused vs explicit"
        detail = (f"rel L2 {r['rel_l2']:.2e}, top-1 agreement {r['top1_agreement']:.2f}" if r["check"] == "precision"
                  else f"max |diff| {r['max_abs_diff']:.2e} (tol {r['tolerance']:.1e}, {r['attention_modules']} modules)")
        print(f"[{'ok' if r['ok'] else 'FAIL'}] {r['check']:<9} {r['method']:<9} {what:<17} {detail}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
