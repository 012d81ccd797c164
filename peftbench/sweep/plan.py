"""Planning a sweep: methods × tasks under one protocol, every input checked before any compute.

``plan(settings)`` resolves every name, parses every option, checks the backbone checkpoint and
reads every split list (so a bad line or a missing file stops the sweep before the first epoch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import checkpoint_id, create_backbone, resolve_checkpoint
from ..data.splits import fingerprint, read_split
from ..data.verify import require_verified
from ..errors import DataError, OptionError, SettingsError
from ..methods import Method, get_method
from ..tasks import Task, default_data_root, get_suite, get_task, task_splits
from .protocols import PlanContext, get_protocol


@dataclass
class SweepSettings:
    methods: list[str]
    suite: str = "demo"
    tasks: list[str] | None = None
    protocol: str | None = None
    seeds: list[int] | None = None
    num_seeds: int | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    data_root: str | None = None
    sets: list[str] = field(default_factory=list)  # "--set [method.]key=value"
    overrides: dict = field(default_factory=dict)  # hyper-parameter overrides
    verify_data: bool = True
    precision: str | None = None  # None: the protocol's default for the device
    device: str = "cpu"  # where the runs will train (the protocol's default precision depends on it)


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
                raise SettingsError(f"--set {item!r}: method {m.name!r} has no option {opt!r} "
                                    f"(its options: {', '.join(sorted(m.options)) or 'none'})")
            per[m.name][opt] = value
        else:
            owners = [m for m in methods if key in m.options]
            if not owners and strict:
                raise SettingsError(f"--set {item!r}: none of the selected methods has an option {key!r}")
            for m in owners:
                per[m.name][key] = value
    return per


def config_label(method: Method, raw: dict[str, str]) -> str:
    if not raw:
        return method.name
    return method.name + "(" + ",".join(f"{k}={raw[k]}" for k in sorted(raw)) + ")"


def plan(settings: SweepSettings, *, check_data: bool = True) -> list[PlanContext]:
    """Every (method, task) context of the sweep, after checking all input."""
    suite = get_suite(settings.suite)
    protocol = get_protocol(settings.protocol or suite.protocol)
    methods = [get_method(m) for m in settings.methods]
    if len({m.name for m in methods}) != len(methods):
        raise SettingsError("--methods lists a method twice")
    tasks: list[Task] = [get_task(t) for t in (settings.tasks or suite.tasks)]
    for t in tasks:
        if t.suite != suite.name:
            raise SettingsError(f"task {t.name!r} belongs to suite {t.suite!r}, not {suite.name!r}")
    raw = parse_sets(settings.sets, methods)
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
    backbone = settings.backbone or suite.backbone
    resolve_checkpoint(backbone, settings.checkpoint)  # a missing file fails here
    if check_data:
        create_backbone(backbone, settings.checkpoint)  # weights that do not fit fail here, not mid-sweep
    ck_id = checkpoint_id(backbone, settings.checkpoint)
    try:
        data_root = Path(settings.data_root) if settings.data_root else default_data_root(suite)
    except DataError:
        if check_data:
            raise
        data_root = Path("DATA-ROOT-UNSET")  # planning only (--dry-run)
    if check_data and settings.verify_data:  # every defect of every task, before any compute
        require_verified(tasks, data_root)
    precision = settings.precision or protocol.default_precision(torch.device(settings.device).type)
    contexts = []
    for t in tasks:
        fp = None
        if check_data:
            for split in sorted(task_splits(t)):
                read_split(t, data_root, split)  # raises DataError naming the file/line
            fp = fingerprint(t, data_root)
        for m in methods:
            opts, sources = m.resolve_options(parsed[m.name], t)
            contexts.append(PlanContext(
                method=m, task=t, suite=suite, protocol=protocol, options=opts, option_sources=sources,
                config=config_label(m, raw[m.name]) + ("" if backbone == suite.backbone else f"@{backbone}"),
                seeds=seeds, backbone=backbone,
                checkpoint=str(Path(settings.checkpoint).resolve()) if settings.checkpoint else None,
                checkpoint_id=ck_id, data_root=str(data_root.resolve()), fingerprint=fp,
                overrides=dict(settings.overrides), precision=precision))
    return [ctx.protocol.adapt(ctx) for ctx in contexts]
