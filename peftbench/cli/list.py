"""``peftbench list methods|tasks|suites|protocols|backbones``."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("list", help="list methods, tasks, suites, protocols or backbone presets")
    p.add_argument("what", choices=["methods", "tasks", "suites", "protocols", "backbones"])
    p.set_defaults(func=main)


def main(args) -> int:
    if args.what == "methods":
        from ..methods import METHODS

        for name, m in METHODS.items():
            aliases = METHODS.aliases_of(name)
            print(f"{name:<18} {m.description}" + (f" (alias: {', '.join(aliases)})" if aliases else ""))
    elif args.what == "tasks":
        from ..tasks import TASKS

        for name, t in sorted(TASKS.items(), key=lambda kv: (kv[1].suite, kv[1].group or "", kv[0])):
            print(f"{t.suite:<6} {name:<24} {t.num_classes:>4} classes  {t.group or '':<12} {t.description}")
    elif args.what == "suites":
        from ..tasks import SUITES

        for name, s in SUITES.items():
            print(f"{name:<8} {len(s.tasks):>3} tasks  protocol={s.protocol:<6} backbone={s.backbone}  {s.description}")
    elif args.what == "protocols":
        from ..sweep.protocols import PROTOCOLS

        for name, p in PROTOCOLS.items():
            print(f"{name:<8} {p.description}")
    else:
        from ..backbones import BACKBONES

        for name, p in BACKBONES.items():
            print(f"{name:<18} {p.description}")
        print("(any timm ViT name also works, e.g. vit_base_patch16_224.orig_in21k)")
    return 0
