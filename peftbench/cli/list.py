"""``peftbench list methods|tasks|suites|protocols|backbones|executors|trackers|layouts|columns``."""
from __future__ import annotations

import importlib


def _methods(name, m, reg):
    aliases = reg.aliases_of(name)
    fam = "" if tuple(m.families) == ("vit",) else f" [backbones: {', '.join(m.families)}]"
    return f"{name:<18} {m.description}" + (f" (alias: {', '.join(aliases)})" if aliases else "") + fam


# what: (module, registry attribute, one line per item, sort key)
LISTS = {
    "methods": ("peftbench.methods", "METHODS", _methods, None),
    "tasks": ("peftbench.tasks", "TASKS",
              lambda n, t, r: f"{t.suite:<6} {n:<24} {t.num_classes:>4} classes  {t.group or '':<12} {t.description}",
              lambda kv: (kv[1].suite, kv[1].group or "", kv[0])),
    "suites": ("peftbench.tasks", "SUITES",
               lambda n, s, r: f"{n:<8} {len(s.tasks):>3} tasks  protocol={s.protocol:<6} backbone={s.backbone}  "
                               f"{s.description}", None),
    "protocols": ("peftbench.sweep.protocols", "PROTOCOLS", lambda n, p, r: f"{n:<8} {p.description}", None),
    "backbones": ("peftbench.backbones", "BACKBONES", lambda n, p, r: _backbone_line(n, p), None),
    "executors": ("peftbench.executors", "EXECUTORS", lambda n, e, r: f"{n:<10} {e.description}", None),
    "trackers": ("peftbench.trackers", "TRACKERS", lambda n, t, r: f"{n:<12} {t.description}", None),
    "layouts": ("peftbench.data.layouts", "LAYOUTS", lambda n, x, r: f"{n:<12} {x.description}", None),
    "columns": ("peftbench.results.columns", "COLUMNS", lambda n, c, r: f"{n:<40} {c.doc}", None),
}
def _backbone_line(name, p) -> str:
    """A preset: family, timm name and tag, resolution, normalisation, pooling, weights, what it is."""
    from ..backbones import FAMILY_KWARGS, normalisation

    size = p.kwargs.get("img_size", 224)
    given = normalisation(name)
    norm = "imagenet" if given is None else "clip" if round(given[0][0], 3) == 0.481 else \
        ",".join(f"{m:g}" for m in given[0])
    weights = "file" if p.checkpoint else p.layout + " release file" if p.weights else \
        "timm hub" if "." in p.timm_name else "random"
    from ..methods import METHODS

    tuners = sum(1 for _, m in METHODS.items() if p.family in m.families)
    pool = {**FAMILY_KWARGS.get(p.family, {}), **p.kwargs}.get("global_pool", "token")
    return (f"{name:<22} {p.family:<5} {p.timm_name:<38} {size:>4}px  norm={norm:<8} "
            f"pool={pool:<5} weights={weights:<18} methods={tuners:<3} table=\"{p.table or name}\"  {p.description}")


NOTES = {"backbones": "(any timm ViT or Swin name also works, e.g. vit_base_patch16_224.orig_in21k; methods = how many "
                      "methods tune the family: `peftbench list methods` says which, docs/methods/README.md; table = the papers' "
                      "table its results go in: leaderboards rank each apart, docs/leaderboard.md)"}


def register(sub) -> None:
    p = sub.add_parser("list", help="list methods, tasks, suites, protocols, backbones, executors, trackers, layouts, columns")
    p.add_argument("what", choices=list(LISTS))
    p.set_defaults(func=main)


def main(args) -> int:
    module, attr, line, order = LISTS[args.what]
    registry = getattr(importlib.import_module(module), attr)
    items = registry.items() if order is None else sorted(registry.items(), key=order)
    for name, item in items:
        print(line(name, item, registry))
    if args.what in NOTES:
        print(NOTES[args.what])
    for problem in registry.problems():
        print(f"problem: {problem}")
    return 0
