"""One training step of K configurations: K separate models vs one fused model (docs/fused.md §5).

    python scripts/fused_step.py [--methods vpt-deep,lora] [--backbone demo-vit-random] [--batch-size 64] [--k 4]

Times (median of ``--steps`` after two warm-up steps) K separate SGD steps of K models of a method on one
random batch, against one :class:`peftbench.train.fused.FusedModel` step over the K, with timm's
attention as it is (``F.scaled_dot_product_attention``, which has no vmap batching rule on CPU: vmap
loops over the K configurations for it) and with timm's explicit attention path (``fused_attn = False``:
matmul and softmax, which vmap batches). Prints the three times and the speed-ups: where a step is
compute-bound (a CPU), fusing K configurations cannot do fewer FLOPs than K steps; where it is
bound by per-op overhead (small models on a GPU), one fused step pays that overhead once.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from peftbench.backbones import create_backbone
    from peftbench.methods import get_method
    from peftbench.train.fused import FusedModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="vpt-deep,lora")
    ap.add_argument("--backbone", default="demo-vit-random")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    backbone = create_backbone(args.backbone, None)
    size = backbone.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)

    def median_time(step):
        step(), step()
        times = []
        for _ in range(args.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"{args.backbone}, batch {args.batch_size}, K = {args.k}, {dev} ({torch.get_num_threads()} threads); "
          "ms per step of the K configurations")
    print("| method | K separate steps | fused (SDPA) | fused (explicit attention) | speed-up SDPA | speed-up explicit |")
    print("|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        method = get_method(name)
        opts, _ = method.resolve_options(method.parse_options({}), None)

        def models():
            out = []
            for _ in range(args.k):
                torch.manual_seed(0)
                out.append(method.build(copy.deepcopy(backbone), 10, dict(opts)).to(dev).train())
            return out

        def sgd(ms):
            return [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in ms]

        sep = models()
        sep_opt = sgd(sep)

        def separate():
            for m, o in zip(sep, sep_opt):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                o.step()

        t = {"separate": median_time(separate)}
        for explicit in (False, True):
            ms = models()
            fused = FusedModel(ms[0])
            for m in ms[1:]:
                fused.add(m)
            if explicit:
                for mod in ms[0].modules():
                    if hasattr(mod, "fused_attn"):
                        mod.fused_attn = False
            opt = sgd(ms)
            t[explicit] = median_time(lambda: fused.train_step(x, y, opt, list(range(args.k)), dev))
        print(f"| {name} | {1e3 * t['separate']:.1f} | {1e3 * t[False]:.1f} | {1e3 * t[True]:.1f} | "
              f"{t['separate'] / t[False]:.2f} | {t['separate'] / t[True]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
