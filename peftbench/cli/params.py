"""``peftbench params``: a method's parameter counts without training and without weights."""
from __future__ import annotations

import json

MAX_CLASSES = 1_000_000  # a classification head wider than this is a typo (ImageNet-21k has 21,843 classes)


def register(sub) -> None:
    p = sub.add_parser("params", help="parameter counts of a method (no training, no weights)",
                       description="Build the method on the backbone on the meta device (no memory, no weights) and "
                                   "print its trainable, tuned and total parameters. `--options` lists the method's "
                                   "options (what --set takes), with their defaults, bounds and meaning.")
    p.add_argument("--method", required=True, help="a registered method (peftbench list methods)")
    p.add_argument("--num-classes", type=int, help="classes of the head (required unless --options)")
    p.add_argument("--backbone", default="vit_base_patch16_224",
                   help="timm architecture or preset (default vit_base_patch16_224: ViT-B/16)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD.]OPTION=VALUE",
                   help="a method option, e.g. --set rank=4 (repeatable; --options lists them)")
    p.add_argument("--options", action="store_true", help="list the method's options and stop")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=main)


def option_lines(method) -> list[str]:
    """One line per option of ``method``: name, default, what it accepts, what it does."""
    out = []
    for name, o in sorted(method.options.items()):
        accepts = (" | ".join(map(str, o.choices)) if o.choices else
                   (f"{o.min:g}.." if o.min is not None else "") + (f"{o.max:g}" if o.max is not None else "")
                   if o.min is not None or o.max is not None else
                   (o.type or (type(o.default) if o.default is not None else None) or type("value", (), {})).__name__)
        if o.keywords:
            accepts += " or " + " | ".join(o.keywords)
        out.append(f"  {name:<22} default {o.default!s:<14} {accepts:<22} {o.help}")
    return out or ["  (no options)"]


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
    from ..errors import SettingsError
    from ..methods import get_method

    if args.options:
        method = get_method(args.method)
        print(f"options of {method.name} (--set [{method.name}.]OPTION=VALUE):")
        print("\n".join(option_lines(method)))
        return 0
    if args.num_classes is None:
        raise SettingsError("--num-classes N is required (the head's classes), unless --options")
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
