"""Finished runs produced by other code than the installed one (stale results), found before a
sweep runs: reported, and set aside for a rerun with ``--rerun-stale``."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..fingerprint import loaded_fingerprint, staleness
from ..methods import get_method
from ..store import RunSpec, RunStore


@dataclass
class Freshness:
    done: int = 0  # finished runs of the sweep
    stale: dict[str, list[RunSpec]] = field(default_factory=dict)  # method -> its stale finished runs
    parts: dict[str, Counter] = field(default_factory=dict)  # method -> what changed (method, engine)
    unknown: int = 0  # finished runs recorded without code fingerprints (peftbench < 0.2)

    def lines(self) -> list[str]:
        out = []
        for m, specs in sorted(self.stale.items()):
            what = " and ".join(f"its {p} code" if p == "method" else "peftbench's training code"
                                for p in sorted(self.parts[m]))
            out.append(f"{len(specs)} finished run(s) of {m!r} were produced by other code ({what} changed since) at "
                       f"the same method version: their results may be stale. Rerun them with --rerun-stale, "
                       f"or bump {m}'s version if the change alters results")
        return out


def check(specs: list[RunSpec], store: RunStore) -> Freshness:
    f = Freshness()
    current: dict[str, dict] = {}
    for spec in specs:
        rec = store.load(spec)
        if rec is None or not rec.is_final:
            continue
        f.done += 1
        if not rec.code:
            f.unknown += 1
            continue
        if spec.method not in current:
            current[spec.method] = loaded_fingerprint(get_method(spec.method))
        changed = staleness(rec.code, current[spec.method])
        if changed:
            f.stale.setdefault(spec.method, []).append(spec)
            f.parts.setdefault(spec.method, Counter()).update(changed)
    return f


def set_aside(specs: list[RunSpec], store: RunStore) -> int:
    """Move the records of ``specs`` to ``<key>.stale.json`` (kept, not read as records) so they rerun."""
    n = 0
    for spec in specs:
        path = store.record_path(spec)
        if path.exists():
            path.replace(path.with_name(f"{spec.key}.stale.json"))
            n += 1
    return n
