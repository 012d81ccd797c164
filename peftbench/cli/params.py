"""``peftbench params``: a method's parameter counts without training and without weights."""
from __future__ import annotations

import json

MAX_CLASSES = 1_000_000  # a classification head wider than this is a typo (ImageNet-21k has 21,843 classes)


def register(sub) -> None:
    p = sub.add_parser("params", help="parameter counts of a method (no training, no weights)")
    p.add_argument("--method", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--backbone", default="vit_base_patch16_224",
                   help="timm architecture or preset (default vit_base_patch16_224: ViT-B/16)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD.]OPTION=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=main)


def count(method_name: str, num_classes: int, backbone: str = "vit_base_patch16_224",
          sets: list[str] | None = None) -> dict:
    from ..errors import SettingsError

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise SettingsError(f"--num-classes {num_classes!r}: must be a whole number of classes from 1 to {MAX_CLASSES:,}")
    import torch

    from ..backbones import create_backbone
    from ..methods import get_method
    from ..sweep.plan import parse_sets
    from ..train.build import parameter_summary

    method = get_method(method_name)
    method.check_backbone(backbone)
    opts = method.parse_options(parse_sets(sets or [], [method])[method.name])
    opts, _ = method.resolve_options(opts, None)
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = method.build(create_backbone(backbone, pretrained=False), num_classes, opts)
    counts = parameter_summary(model)
    return {"method": method.name, "backbone": backbone, "num_classes": num_classes, "options": opts, **counts}


def main(args) -> int:
    out = count(args.method, args.num_classes, args.backbone, args.sets)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True, default=str))
        return 0
    print(f"method      {out['method']}  options {out['options']}")
    print(f"backbone    {out['backbone']}, {out['num_classes']} classes")
    extra = [k for k in out if k not in ("method", "backbone", "num_classes", "options", "trainable",
                                         "trainable_without_head", "head", "total", "tuned", "tuned_total_pct")]
    print(f"trainable   {out['trainable']:,} (without head {out['trainable_without_head']:,}; head {out['head']:,})")
    print(f"tuned       {out['tuned']:,}  ({out['tuned_total_pct']:.4f} % of {out['total']:,} total)")
    for k in extra:
        v = out[k]
        print(f"{k:<11} {v:,}" if isinstance(v, int) else f"{k:<11} {v}")
    return 0
