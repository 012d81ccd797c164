"""What a method plugin is: its options, its training recipe and how it turns a backbone into a model.

A plugin is one file in ``methods/`` (or in any package that declares a ``peftbench.methods``
entry point) with a :class:`Method` subclass decorated by :func:`register_method`::

    @register_method
    class BitFit(Method):
        name = "bitfit"
        description = "biases of the backbone + head"
        recipe = FULL_FT_RECIPE

        def build(self, backbone, num_classes, opts):
            model = TunedViT(backbone, num_classes)
            for n, p in backbone.named_parameters():
                p.requires_grad = n.endswith("bias")
            return model

The engine never asks which method it runs: it builds the model, trains whatever ``requires_grad``
says, keeps every module except ``model.train_modules`` in eval mode, and counts parameters.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generator, Mapping

from torch import nn

from .._registry import Registry
from ..errors import OptionError, bounds_problem
from ..layers.tuned_vit import TunedViT
from ._recipes import PROMPT_RECIPE, Recipe

if TYPE_CHECKING:  # the hooks' argument types (no runtime import: the sweep layer sits above this one)
    from ..store import RunSpec, RunStore
    from ..sweep.protocols import EvalProtocol, PlanContext
    from ..tasks import Task
    from ..train.engine import Env

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

AUTO = "auto"  # the value of an option with a per-task value that says "take the task's value"
PACKAGE_DIR = Path(__file__).parent  # the built-in methods' folder (data files are shown relative to it)


@dataclass(frozen=True)
class PerTask:
    """Where an option's per-task value comes from, as data beside the method (timm keeps ``default_cfgs``
    beside a model): ``Option("auto", ..., per_task=PerTask(...))``.

    ``table`` is a CSV file (a path, usually ``Path(__file__).with_name(...)``: one row per task, a ``task``
    column, the value in ``column``, an optional ``source`` column) or a mapping {task name: value} (``column``:
    an index into a tuple value). ``by`` names another option whose value picks the table: ``table`` is then
    {that option's value: table}. ``source`` says where the values come from (repository@commit:path or a
    paper's table); it may use ``{task}`` and the options (``{placement}``), and with ``by`` it may be a mapping
    like ``table``. A task without a value (or no task,
    e.g. ``peftbench params``) gets ``fallback``, and the run records say which."""

    table: Any
    fallback: Any
    column: str | int | None = None
    source: Any = ""
    by: str | None = None
    fallback_reason: str = "task without a per-task value"

    def lookup(self, task: "Task | None", opts: Mapping[str, Any]) -> tuple[Any, str]:
        """(value, where it came from) for ``task`` under the other options ``opts``."""
        table = self.table[opts[self.by]] if self.by else self.table
        source = self.source[opts[self.by]] if self.by and isinstance(self.source, Mapping) else self.source
        name = getattr(task, "name", None)
        fields = {**{k: v for k, v in opts.items() if isinstance(v, (str, int, float, bool))}, "task": name}
        if isinstance(table, Path):
            shown = _shown(table)
            row = _csv_rows(str(table)).get(name) if name else None
            value = (row or {}).get(str(self.column), "").strip()
            if value:
                src = source.format(**fields) if source else (row or {}).get("source", "").strip()
                return value, f"{shown} [{name}]" + (f": {src}" if src else "")
            return self.fallback, f"default {self.fallback} (task not in {shown})"
        if name in table:
            value = table[name]
            if self.column is not None:
                value = value[self.column]
            return value, f"{value}: {source.format(**fields)} [{name}]" if source else f"{value} [{name}]"
        return self.fallback, f"{self.fallback}: default ({self.fallback_reason})"


def _shown(path: Path) -> str:
    try:
        return "methods/" + path.relative_to(PACKAGE_DIR).as_posix()
    except ValueError:
        return path.name


@functools.lru_cache(maxsize=None)
def _csv_rows(path: str) -> dict[str, dict[str, str]]:
    """The rows of a per-task CSV by canonical task name (``#`` lines are comments)."""
    from ..tasks import TASKS

    rows = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(line for line in fh if not line.startswith("#")), 2):
            try:
                rows[TASKS.canonical(row["task"])] = row
            except KeyError as exc:
                raise ValueError(f"{path}: row {lineno}: {exc}") from None
    return rows


def per_task_row(table: Path, task: "Task | None") -> dict[str, str]:
    """The row of ``task`` in a per-task CSV beside a method ({} when it has none): values an option does not
    hold (e.g. a recipe's per-task batch size)."""
    name = getattr(task, "name", None)
    return dict(_csv_rows(str(table)).get(name) or {}) if name else {}


@dataclass(frozen=True)
class Option:
    """A method option: ``--set <method>.<name>=<value>`` (or ``--set <name>=<value>``).

    Values are converted to ``type`` (default: the type of ``default``); ``keywords`` are literal
    values accepted as they are. ``per_task``: the option takes a per-task value when it is ``"auto"``
    (:class:`PerTask`; ``"auto"`` is then a keyword), resolved by :meth:`Method.resolve_options`."""

    default: Any
    help: str
    choices: tuple | None = None
    type: type | None = None
    keywords: tuple[str, ...] = ()
    min: float | None = None  # bounds of a numeric value (inclusive)
    max: float | None = None
    per_task: PerTask | None = None

    def __post_init__(self):
        if self.per_task is not None and AUTO not in self.keywords:
            object.__setattr__(self, "keywords", (*self.keywords, AUTO))

    def parse(self, name: str, raw: Any) -> Any:
        """Convert a command-line string (or a value from a file) to the option's type."""
        if raw in self.keywords:
            return raw
        kind = self.type or type(self.default)
        value = raw
        try:
            if isinstance(raw, str):
                if kind is bool:
                    low = raw.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    value = low in ("1", "true", "yes", "on")
                elif kind in (int, float):
                    value = kind(raw)
                elif kind is not str:
                    value = _auto(raw)
            elif kind in (int, float) and not isinstance(raw, bool):
                value = kind(raw)
        except (TypeError, ValueError):
            allowed = f" or one of {', '.join(self.keywords)}" if self.keywords else ""
            raise OptionError(f"option {name!r}: cannot read {raw!r} as {kind.__name__}{allowed}") from None
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"option {name!r}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = bounds_problem(value, self.min, self.max)
            if problem:
                raise OptionError(f"option {name!r}: {value!r} {problem}")
        return value


def _auto(raw: str) -> Any:
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


# ---------------------------------------------------------------------------------------------
# Method plugins
# ---------------------------------------------------------------------------------------------


class Method:
    """Base class of a method plugin. Subclasses set the class attributes and implement ``build``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    recipe: ClassVar[Recipe] = PROMPT_RECIPE
    # bump when a change alters the results: the runs' keys change, so finished runs are rerun (a change
    # at the same version is noticed through the records' code fingerprints: "stale", --rerun-stale)
    version: ClassVar[int] = 1
    # True when the features fed to the head do not depend on anything trained (linear probe,
    # MLP head): the engine may then compute them once and train the head on cached features.
    frozen_features: ClassVar[bool] = False
    # True when K configurations of the method that differ only in lr and wd can train as one model
    # (``peftbench run --fuse K``, peftbench.train.fused, docs/fused.md): the backbone stays frozen (in eval
    # mode, without dropout), the trainable tensors and the train modules' buffers are the only things
    # that differ between configurations, and the forward is a function of them that torch.func.vmap
    # batches (no in-place write into a frozen tensor, no autograd.Function without vmap support, no
    # sparse tensors). The engine still checks that the frozen tensors are equal and trains the runs one
    # by one when the fused step fails; a test trains every fusable method fused and separately.
    fusable: ClassVar[bool] = False
    # the backbone families the method tunes (peftbench.backbones.backbone_family); a sweep that pairs it with
    # another family is refused before compute
    families: ClassVar[tuple[str, ...]] = ("vit",)
    # options `peftbench bench` builds the method with unless --set gives them: for a method whose inference
    # cost depends on what its pipeline selects (e2vpt-prune's pruning pattern), a typical selection
    bench_options: ClassVar[dict[str, Any]] = {}

    def build(self, backbone: nn.Module, num_classes: int, opts: dict[str, Any]) -> TunedViT:
        raise NotImplementedError

    # -- options ----------------------------------------------------------------------------
    def default_options(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def check_backbone(self, backbone: str) -> None:
        """A one-line SettingsError, before anything is built, when ``backbone`` belongs to a family this method does
        not tune (docs/methods/README.md: which methods tune which families)."""
        from ..backbones import backbone_family
        from ..errors import SettingsError

        family = backbone_family(backbone)
        if family and family not in self.families:
            raise SettingsError(f"method {self.name!r} does not tune backbones of the {family} family of {backbone!r} "
                                f"(it tunes: {', '.join(self.families)})")

    def parse_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        opts = self.default_options()
        for key, value in raw.items():
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise OptionError(f"method {self.name!r} has no option {key!r} (its options: {known})")
            opts[key] = self.options[key].parse(key, value)
        return opts

    def resolve_options(self, opts: dict[str, Any], task: "Task | None") -> tuple[dict[str, Any], dict[str, str]]:
        """The options for ``task`` (None: no task, e.g. ``peftbench params``): every option with a
        :class:`PerTask` that is ``"auto"`` takes its per-task value (or its fallback), and where each value
        came from. A method that checks combinations of options overrides this and calls it first."""
        opts, sources = dict(opts), {}
        for key, option in self.options.items():
            if option.per_task is not None and opts.get(key) == AUTO:
                value, sources[key] = option.per_task.lookup(task, opts)
                opts[key] = option.parse(key, value)
        return opts, sources

    # -- protocol hooks -----------------------------------------------------------------------
    def pipeline(self, ctx: "PlanContext", protocol: "EvalProtocol") -> Generator[list, list, None]:
        """The stages of this method under ``protocol``; by default the protocol's own pipeline."""
        return protocol.pipeline(ctx)

    def run_job(self, job: str, spec: "RunSpec", store: "RunStore", env: "Env") -> dict:
        """Non-training jobs a custom pipeline schedules (e.g. importance scores). Returns the fields
        to merge into the run record; artifacts go to ``store.artifact_path(spec, name)``."""
        raise NotImplementedError(f"method {self.name!r} has no job {job!r}")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


# built-in methods: the public modules of methods/ (peftbench.methods); plugins: the `peftbench.methods` entry points
METHODS: Registry[Method] = Registry("method", builtin="peftbench.methods", group="peftbench.methods", base=Method)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of a :class:`Method` subclass under ``cls.name``."""
    return METHODS.register_class(cls)


def get_method(name: str) -> Method:
    return METHODS.get(name)
