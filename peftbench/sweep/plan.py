"""Planning a sweep: methods × tasks under one protocol, every input checked before any compute.

``plan(sweep)`` (a :class:`peftbench.api.schema.Sweep`, whose fields are checked when it is made) resolves
every name, parses every option, checks the backbone checkpoint and reads every split list (so a bad
line or a missing file stops the sweep before the first epoch).
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..backbones import checkpoint_id, create_backbone, resolve_checkpoint
from ..data.splits import fingerprint, read_split
from ..data.verify import require_verified
from ..errors import DataError, OptionError, PeftbenchError, SettingsError
from ..methods import Method, get_method
from ..tasks import Task, default_data_root, get_suite, get_task, task_splits
from .drive import too_many_runs
from .protocols import PlanContext, get_protocol

if TYPE_CHECKING:  # (the sweep's declaration is the API layer's: peftbench.api.schema)
    from ..api.schema import Sweep


def parse_sets(sets: list[str], methods: list[Method], *, strict: bool = True) -> dict[str, dict[str, str]]:
    """``[method.]key=value`` → {method name: {key: raw value}}. Unqualified keys go to every selected
    method that has the option; a key no selected method knows is an error (``strict=False``: ignored,
    for commands such as ``bench`` that apply one list of settings to several methods in turn)."""
    per: dict[str, dict[str, str]] = {m.name: {} for m in methods}
    for item in sets:
        if "=" not in item:
            raise SettingsError(f"--set {item!r}: expected [method.]option=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            mname, opt = key.rsplit(".", 1)
            m = get_method(mname)
            if m.name not in per:
                if not strict:
                    continue
                raise SettingsError(f"--set {item!r}: method {m.name!r} is not in --methods")
            if opt not in m.options:
                if not strict:
                    continue
                close = difflib.get_close_matches(opt, sorted(m.options), n=1, cutoff=0.6)
                raise SettingsError(f"--set {item!r}: method {m.name!r} has no option {opt!r}"
                                    + (f"; did you mean {close[0]!r}?" if close else "")
                                    + f" (its options: {', '.join(sorted(m.options)) or 'none'})")
            per[m.name][opt] = value
        else:
            owners = [m for m in methods if key in m.options]
            if not owners and strict:
                known = sorted({o for m in methods for o in m.options})
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                raise SettingsError(f"--set {item!r}: none of the selected methods has an option {key!r}"
                                    + (f"; did you mean {close[0]!r}?" if close else "")
                                    + f" (options: {', '.join(known) or 'none'}; `peftbench params --method M --options` "
                                      "describes them)")
            for m in owners:
                per[m.name][key] = value
    return per


def config_label(method: Method, raw: dict[str, str]) -> str:
    if not raw:
        return method.name
    return method.name + "(" + ",".join(f"{k}={raw[k]}" for k in sorted(raw)) + ")"


def plan(sweep: Sweep, *, device: str = "cpu", check_data: bool = True) -> list[PlanContext]:
    """Every (method, task) context of ``sweep``, after checking all input (``device``: where the runs will
    train; the protocol's default precision depends on it)."""
    settings = sweep
    suite = get_suite(settings.suite)
    protocol = get_protocol(settings.protocol or suite.protocol)
    if settings.card and not getattr(protocol, "uses_card", False):
        raise SettingsError(f"--card {settings.card}: a card file is what --protocol card trains; the protocol here "
                            f"is {protocol.name!r}")
    methods = [get_method(m) for m in settings.methods]
    if not methods:
        raise SettingsError("--methods names no method (give --methods, or `methods` in the sweep file; "
                            "peftbench list methods)")
    if len({m.name for m in methods}) != len(methods):
        raise SettingsError("--methods lists a method twice")
    overrides = settings.overrides()
    search = settings.search_strategy()
    tasks: list[Task] = [get_task(t) for t in (settings.tasks or suite.tasks)]
    for t in tasks:
        if t.suite != suite.name:
            raise SettingsError(f"task {t.name!r} belongs to suite {t.suite!r}, not {suite.name!r}")
    raw = parse_sets(settings.all_sets(), methods)
    parsed = {}
    for m in methods:
        try:
            parsed[m.name] = m.parse_options(raw[m.name])
        except OptionError as exc:
            raise SettingsError(f"--set: {exc}") from None
    if settings.seeds:
        seeds = tuple(settings.seeds)
    else:
        n = settings.num_seeds or len(protocol.default_seeds)
        base = protocol.default_seeds if n <= len(protocol.default_seeds) else \
            tuple(protocol.default_seeds) + tuple(range(1000, 1000 + n - len(protocol.default_seeds)))
        seeds = tuple(base[:n])
    check_run_count(settings.max_runs, len(methods), len(tasks), protocol.least_runs(
        len(settings.lr or [0]) * len(settings.wd or [0]), len(seeds)))
    backbone = settings.backbone or suite.backbone
    for m in methods:
        m.check_backbone(backbone)
    resolve_checkpoint(backbone, settings.checkpoint)  # a missing file fails here
    if check_data:
        create_backbone(backbone, settings.checkpoint)  # weights that do not fit fail here, not mid-sweep
    ck_id = checkpoint_id(backbone, settings.checkpoint)
    data_root: Path | None
    try:
        data_root = Path(settings.data_root) if settings.data_root else default_data_root(suite)
    except DataError:
        if check_data:
            raise
        data_root = None  # planning only (--dry-run): the runs' keys do not depend on where the data is
    if check_data:
        assert data_root is not None  # (default_data_root raised otherwise)
    if check_data and settings.verify_data and data_root is not None:  # every defect of every task, before compute
        require_verified(tasks, data_root)
    precision = settings.precision or protocol.default_precision(torch.device(device).type)
    contexts = []
    for t in tasks:
        fp = None
        if check_data and data_root is not None:
            for split in sorted(task_splits(t)):
                read_split(t, data_root, split)  # raises DataError naming the file/line
            fp = fingerprint(t, data_root)
        elif data_root is not None and (t.materialise is None or t.directory(data_root).is_dir()):
            try:  # planning only: with the data at hand the keys are those of the real runs (done runs count)
                fp = fingerprint(t, data_root)
            except DataError:
                fp = None
        for m in methods:
            opts, sources = m.resolve_options(parsed[m.name], t)
            contexts.append(PlanContext(
                method=m, task=t, suite=suite, protocol=protocol, options=opts, option_sources=sources,
                config=config_label(m, raw[m.name]) + ("" if backbone == suite.backbone else f"@{backbone}"),
                seeds=seeds, backbone=backbone,
                checkpoint=str(Path(settings.checkpoint).resolve()) if settings.checkpoint else None,
                checkpoint_id=ck_id, data_root=str(data_root.resolve()) if data_root else None, fingerprint=fp,
                overrides=dict(overrides), precision=precision, search=search,
                seeds_given="seeds" if settings.seeds else "num_seeds" if settings.num_seeds else "",
                given_options=frozenset(raw[m.name]),
                card=str(Path(settings.card).resolve()) if settings.card else None))
    contexts = [ctx.protocol.adapt(ctx) for ctx in contexts]
    check_models(contexts, device)
    return contexts


def check_run_count(limit: int, methods: int, tasks: int, per_pair: int) -> None:
    """Refuse, before anything is built, a sweep whose method × task pairs times the runs each pair plans at
    least (:meth:`~peftbench.sweep.protocols.EvalProtocol.least_runs`) exceed ``limit`` (its ``max_runs``)."""
    runs = methods * tasks * per_pair
    if runs > limit:
        raise too_many_runs(runs, limit, f" ({methods:,} method(s) × {tasks:,} task(s) × at least {per_pair:,} "
                                         "run(s) each)")


def _memory_bytes(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_models(contexts: list[PlanContext], device: str = "cpu") -> None:
    """Build every (method, options, classes) model once on the meta device: options that cannot build
    and models that cannot fit in memory stop the sweep here, before any compute; a method whose
    options leave nothing but the head to train is warned about."""
    from ..fingerprint import engine_fingerprint, loaded_fingerprint
    from ..train.build import parameter_summary

    engine_fingerprint()  # (the code this process runs, as its records will say: before any file can change)
    for ctx in contexts:
        loaded_fingerprint(ctx.method)
    memory = _memory_bytes(device)
    seen: set[str] = set()
    backbones: dict[str, torch.nn.Module] = {}
    for ctx in contexts:
        key = json.dumps([ctx.method.name, ctx.options, ctx.task.num_classes, ctx.backbone], sort_keys=True,
                         default=str)
        if key in seen:
            continue
        seen.add(key)
        what = f"method {ctx.config!r} on task {ctx.task.name!r}"
        try:
            with torch.device("meta"):
                if ctx.backbone not in backbones:
                    backbones[ctx.backbone] = create_backbone(ctx.backbone, pretrained=False)
                model = ctx.method.build(copy.deepcopy(backbones[ctx.backbone]), ctx.task.num_classes,
                                         dict(ctx.options))
            counts = parameter_summary(model)
        except (PeftbenchError, ValueError, TypeError, RuntimeError, KeyError) as exc:
            raise SettingsError(f"{what}: the model cannot be built with options {ctx.options}: "
                                f"{type(exc).__name__}: {exc}") from None
        need = 4 * (counts["total"] + 3 * counts["trainable"])  # fp32 weights, gradients, two optimiser states
        if need > memory:
            raise SettingsError(
                f"{what}: {counts['trainable']:,} trainable parameters ({need / 2**30:.1f} GiB for weights, gradients "
                f"and optimiser state) cannot fit in the {memory / 2**30:.1f} GiB of {device}; check its options "
                f"({', '.join(f'{k}={v}' for k, v in sorted(ctx.options.items()))})")
        if counts["trainable_without_head"] == 0 and not ctx.method.frozen_features:
            print(f"peftbench: warning: {what} trains nothing but the head with these options "
                  f"({', '.join(f'{k}={v}' for k, v in sorted(ctx.options.items())) or 'defaults'})",
                  file=sys.stderr)
