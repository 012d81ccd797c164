"""What a sweep is, declared once: :class:`Sweep`, whose every field carries its declaration (:class:`Spec`:
kind, bounds, choices, help, group, command-line flag, sweep-file key).

Everything else is derived from these declarations:

* the Python API's keyword arguments: ``Sweep(...)`` checks every value it is given (:meth:`Sweep.__post_init__`);
* the ``peftbench run`` flags and their argument groups (:func:`add_arguments`, :func:`from_args`);
* the sweep file's keys and their validation, with file and line in every error (:mod:`peftbench.api.sweepfile`);
* the table of docs/sweep-files.md (:func:`markdown_table`; a test keeps the page equal to it).

Values are checked against their bounds: every number is finite and within limits that a real sweep never
reaches (a typo such as ``num_seeds = 100000000`` is an error before anything is planned), every name is
resolved in its registry (did-you-mean included). Generic executor settings (``gpus_per_node``, ``timeout_min``,
``max_retries``, ...) are translated by each executor into its own (submitit's habit); an executor's own
settings go into ``executor_settings`` (``--executor-set KEY=VALUE``, ``[executor.<name>]``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .._io import toml_value
from ..errors import PeftbenchError, SettingsError, bounds_problem

MAX_SEED = 2**31 - 1  # the epoch order seeds a generator with seed × 1,000,003 + epoch
MAX_RUNS = 100_000  # the default limit of the runs one sweep may plan (max_runs, --max-runs)
GROUPS = {"what": "what to run", "training": "training", "search": "search: how the lr × wd point is chosen",
          "execution": "where and how runs execute", "output": "output", "tracking": "experiment tracking"}
KINDS = ("str", "path", "int", "float", "bool", "names", "ints", "numbers", "table", "strings")


@dataclass(frozen=True)
class Spec:
    """The declaration of one sweep field."""

    kind: str  # one of KINDS
    help: str
    group: str  # one of GROUPS
    choices: Any = None  # a tuple, or a callable returning the registered names (help text and did-you-mean)
    canonical: Callable[[str], str] | None = None  # resolves a name in its registry (raises on unknown names)
    min: float | None = None
    max: float | None = None
    max_items: int | None = None
    flag: str | None = ""  # "" -> "--" + the name with dashes; None: no flag
    key: str | None = ""  # the sweep file's key ("" -> the name; None: not in files)
    table: str = ""  # the sweep file's table ("" top level, "search", "executor", "tracking")
    metavar: str | None = None
    optional: bool = True  # None is a value (the default, or "not given")
    nonempty: bool = False  # a list must have at least one item

    def choice_names(self) -> list[str]:
        c = self.choices() if callable(self.choices) else self.choices
        return list(c or ())


def _registry(kind: str) -> Callable[[], Any]:
    def get():
        if kind == "method":
            from ..methods import METHODS as reg
        elif kind == "suite":
            from ..tasks import SUITES as reg
        elif kind == "task":
            from ..tasks import TASKS as reg
        elif kind == "protocol":
            from ..sweep.protocols import PROTOCOLS as reg
        elif kind == "executor":
            from ..executors import EXECUTORS as reg
        elif kind == "tracker":
            from ..trackers import TRACKERS as reg
        else:  # pragma: no cover
            raise KeyError(kind)
        return reg
    return get


def _names_of(kind: str) -> Callable[[], list[str]]:
    return lambda: _registry(kind)().names()


def _canonical_of(kind: str) -> Callable[[str], str]:
    return lambda name: _registry(kind)().canonical(name)


def _unknown_task_of_suite(suite: str, tasks: list, where: str = "Sweep(tasks=...)") -> None:
    """Raise the error of the first name in ``tasks`` that is no task, with a did-you-mean and the list of the tasks of
    ``suite`` (the sweep's suite: the tasks it can take), when the suite is known; else return."""
    import difflib

    from ..tasks import SUITES, TASKS

    if not isinstance(suite, str) or suite not in SUITES:
        return
    own = list(SUITES.get(suite).tasks)
    for t in tasks:
        if isinstance(t, str) and t not in TASKS:
            close = difflib.get_close_matches(t, own, n=1, cutoff=0.5)
            raise SettingsError(f"{where}: unknown task {t!r}." + (f" Did you mean {close[0]!r}?" if close else "")
                                + f" Tasks of suite {SUITES.get(suite).name!r}: {', '.join(own)} "
                                  "(`peftbench list tasks` lists every suite's)")


def sweep_field(default: Any, spec: Spec, factory: Callable | None = None):
    meta = {"spec": spec}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SEARCHES = ("grid", "halving")
SAVE_WEIGHTS = ("final", "all", "none")


@dataclass
class Sweep:
    """A sweep: methods × tasks under a protocol, where its runs happen and who watches them. Every field is
    declared here once (its ``Spec`` in the field's metadata); docs/sweep-files.md lists them all."""

    # -- what to run --------------------------------------------------------------------------
    methods: list[str] = sweep_field(None, Spec("names", "methods to run (peftbench list methods)", "what",
                                                canonical=_canonical_of("method"), optional=False, max_items=1000,
                                                metavar="NAME,NAME,..."),
                                     factory=list)
    suite: str = sweep_field("demo", Spec("str", "task suite", "what", choices=_names_of("suite"),
                                          canonical=_canonical_of("suite"), optional=False))
    tasks: list[str] | None = sweep_field(None, Spec("names", "a subset of the suite's tasks (default: all; peftbench "
                                                              "list tasks)", "what", canonical=_canonical_of("task"),
                                                     nonempty=True, max_items=1000, metavar="NAME,NAME,..."))
    protocol: str | None = sweep_field(None, Spec("str", "the evaluation protocol (default: the suite's)", "what",
                                                  choices=_names_of("protocol"), canonical=_canonical_of("protocol")))
    card: str | None = sweep_field(None, Spec("path", "the card file of --protocol card: per-task configurations to "
                                                     "train as given, without a search (written by `peftbench cards`; "
                                                     "docs/protocols.md §15)", "what", metavar="FILE"))
    backbone: str | None = sweep_field(None, Spec("str", "timm model name with its tag, or a preset (default: the "
                                                         "suite's; peftbench list backbones)", "what"))
    checkpoint: str | None = sweep_field(None, Spec("path", "local backbone weights: .npz, .safetensors or .pth", "what",
                                                    metavar="FILE"))
    data_root: str | None = sweep_field(None, Spec("path", "data folder (default: $PEFTBENCH_DATA, or "
                                                           "~/.cache/peftbench/data for the demo)", "what", metavar="DIR"))
    options: dict = sweep_field(None, Spec("table", "method options: {option: value} for every selected method that "
                                                    "has the option (key \"*\"), {method: {option: value}} for one",
                                           "what", flag=None), factory=dict)
    sets: list[str] = sweep_field(None, Spec("strings", "a method option, e.g. e2vpt.prompt_tokens=10 (repeatable)",
                                             "what", flag="--set", key=None, metavar="[METHOD.]OPTION=VALUE",
                                             optional=False), factory=list)
    max_runs: int = sweep_field(MAX_RUNS, Spec("int", "refuse a sweep that plans more runs than this, before anything is "
                                                      "built or trained (a typo in a list of seeds, lrs or tasks)",
                                               "what", min=1, max=1e9, optional=False, metavar="N"))
    # -- training -----------------------------------------------------------------------------
    seeds: list[int] | None = sweep_field(None, Spec("ints", "seeds of the final runs", "training", min=0, max=MAX_SEED,
                                                     nonempty=True, max_items=1000))
    num_seeds: int | None = sweep_field(None, Spec("int", "number of final seeds, instead of seeds (default: the "
                                                          "protocol's: 5 for vpt, 1 for demo)", "training",
                                                   min=1, max=1000))
    precision: str | None = sweep_field(None, Spec("str", "numeric precision of training and evaluation (part of the "
                                                          "run key; default: the protocol's)", "training",
                                                   choices=PRECISIONS))
    device: str | None = sweep_field(None, Spec("str", "cpu | cuda | cuda:N (default: cuda when available)",
                                                "training"))
    # -- search ---------------------------------------------------------------------------------
    lr: list[float] | None = sweep_field(None, Spec("numbers", "base learning rate(s): replace the search grid", "search",
                                                    min=0, max=1e4, nonempty=True, max_items=1000, table="search"))
    wd: list[float] | None = sweep_field(None, Spec("numbers", "weight decay value(s): replace the search grid", "search",
                                                    min=0, max=100, nonempty=True, max_items=1000, table="search"))
    epochs: int | None = sweep_field(None, Spec("int", "number of epochs (default: the recipe's)", "search",
                                                min=1, max=100_000, table="search"))
    batch_size: int | None = sweep_field(None, Spec("int", "batch size (default: the recipe's)", "search",
                                                    min=1, max=65_536, table="search"))
    warmup_epochs: int | None = sweep_field(None, Spec("int", "warm-up epochs (default: the recipe's)", "search",
                                                       min=0, max=100_000, table="search"))
    search: str = sweep_field("grid", Spec("str", "how a search stage picks its point: grid (the papers' protocol: "
                                                  "every point trains every epoch) or halving (successive halving on "
                                                  "the same schedule; docs/sweeps.md)", "search", choices=SEARCHES,
                                           key="kind", table="search", optional=False))
    halving_rungs: list[float] | None = sweep_field(None, Spec("numbers", "halving: the rungs as fractions of the epochs, "
                                                                          "increasing, the last 1 (default 0.1,0.33,1)",
                                                               "search", min=0, max=1, nonempty=True, max_items=100,
                                                               table="search", metavar="F1,F2,...,1"))
    halving_factor: float | None = sweep_field(None, Spec("float", "halving: keep the best 1/factor of the "
                                                                   "configurations after each rung (default 3)",
                                                          "search", min=1, max=1000, table="search", metavar="ETA"))
    # -- execution ------------------------------------------------------------------------------
    executor: str = sweep_field("local", Spec("str", "where runs happen", "execution", choices=_names_of("executor"),
                                              canonical=_canonical_of("executor"), key="name", table="executor",
                                              optional=False))
    gpus_per_node: int | None = sweep_field(None, Spec("int", "GPUs a job or run asks for (slurm, ray; 0: CPU)",
                                                       "execution", min=0, max=64, table="executor"))
    cpus_per_task: int | None = sweep_field(None, Spec("int", "CPUs a job or run asks for (slurm, ray)", "execution",
                                                       min=1, max=4096, table="executor"))
    mem_gb: float | None = sweep_field(None, Spec("float", "memory per job in GB (slurm)", "execution", min=0.001,
                                                  max=1e6, table="executor"))
    timeout_min: int | None = sweep_field(None, Spec("int", "time limit per job in minutes (slurm)", "execution", min=1,
                                                     max=60 * 24 * 366, table="executor"))
    max_retries: int | None = sweep_field(None, Spec("int", "resubmissions of a run whose job or worker died (slurm, "
                                                            "ray)", "execution", min=0, max=1000, table="executor"))
    workers: int | None = sweep_field(None, Spec("int", "runs training at once (local: worker processes, at most 4 per "
                                                        "CPU core; slurm: array tasks; ray: runs in flight)", "execution",
                                                 min=1, max=100_000,
                                                 table="executor"))
    devices: list[str] | None = sweep_field(None, Spec("names", "one local worker per device, e.g. cuda:0,cuda:1 "
                                                                "(local)", "execution", nonempty=True, max_items=256,
                                                       table="executor", metavar="DEV,DEV,..."))
    executor_settings: dict = sweep_field(None, Spec("table", "an executor's own settings: {executor: {key: value}} "
                                                              "([executor.<name>]; --executor-set KEY=VALUE, "
                                                              "--executor-profile FILE)", "execution", flag=None),
                                          factory=dict)
    fuse: int = sweep_field(1, Spec("int", "train up to K runs of one method on one task that differ only in lr / wd "
                                           "together, as one model (docs/fused.md); not part of the run key",
                                    "execution", min=1, max=256, optional=False, metavar="K", table="executor"))
    # -- output ---------------------------------------------------------------------------------
    runs_dir: str = sweep_field("runs", Spec("path", "the run store", "output", optional=False, metavar="DIR"))
    name: str | None = sweep_field(None, Spec("str", "the sweep's name: groups its tracker runs and names "
                                                     "<runs-dir>/sweeps/<name>.toml (default: the sweep file's name, "
                                                     "else <suite>-<hash of its runs>)", "output", flag="--sweep-name"))
    save_weights: str = sweep_field("final", Spec("str", "keep the trained tensors beside the record (for `peftbench "
                                                         "export`): of the runs evaluated on the final split, all, "
                                                         "or none; not part of the run key", "output",
                                                  choices=SAVE_WEIGHTS, optional=False))
    verify_data: bool = sweep_field(True, Spec("bool", "verify the data (split sizes, classes, every image decodes) "
                                                       "before the sweep", "output", flag="--no-verify-data",
                                               optional=False))
    # -- tracking -------------------------------------------------------------------------------
    trackers: list[str] = sweep_field(None, Spec("names", "experiment trackers (docs/trackers.md)", "tracking",
                                                 choices=_names_of("tracker"), canonical=_canonical_of("tracker"),
                                                 flag="--tracker", table="tracking", optional=False), factory=list)
    tracker_settings: dict = sweep_field(None, Spec("table", "a tracker's settings: {tracker: {key: value}} "
                                                             "([tracking.<name>]; --tracker-set TRACKER.KEY=VALUE)",
                                                    "tracking", flag=None), factory=dict)
    # not a setting: the sweep file this sweep was read from (relative paths in it are relative to its folder)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self):
        """Every value checked against its declaration (one-line errors naming the argument). ``search`` may also
        be given as the sweep file's ``[search]`` table, a dict (``search={"epochs": 5, "lr": [0.1]}``)."""
        if isinstance(self.search, dict):
            table, self.search = dict(self.search), "grid"
            keys = {key_of(f.name): f.name for f in fields() if spec(f.name).table == "search"}
            for key, value in table.items():
                if key not in keys:
                    raise SettingsError(f"Sweep(search={{{key!r}: ...}}): unknown key (known: {', '.join(keys)})")
                setattr(self, keys[key], value)
        for f in fields():
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, check(f.name, value, f"Sweep({f.name}=...)"))
            except SettingsError:
                if f.name == "tasks" and isinstance(value, list):
                    _unknown_task_of_suite(self.suite, value)  # the suite's own tasks, not every suite's
                raise
        if self.seeds is not None and self.num_seeds is not None:
            raise SettingsError("Sweep: give seeds or num_seeds, not both")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise SettingsError(f"Sweep(seeds=...): {self.seeds}: a seed is listed twice")

    def replace(self, **changes) -> "Sweep":
        return dataclasses.replace(self, **changes)

    # -- derived --------------------------------------------------------------------------------
    def overrides(self) -> dict:
        """The hyper-parameters this sweep sets over the protocol's and the recipe's."""
        out = {"epochs": self.epochs, "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs,
               "lr_grid": tuple(self.lr) if self.lr else None, "wd_grid": tuple(self.wd) if self.wd else None}
        return {k: v for k, v in out.items() if v is not None}

    def search_strategy(self):
        """The :class:`peftbench.sweep.search.Search` of ``search`` / ``halving_rungs`` / ``halving_factor``."""
        from ..sweep.search import DEFAULT_FACTOR, DEFAULT_RUNGS, Search

        if self.search != "halving":
            given = [f"--{k.replace('_', '-')}" for k in ("halving_rungs", "halving_factor") if getattr(self, k) is not None]
            if given:
                raise SettingsError(f"{', '.join(given)} (search.halving_*) only apply with --search halving")
        return Search(self.search, tuple(self.halving_rungs) if self.halving_rungs else DEFAULT_RUNGS,
                      self.halving_factor if self.halving_factor is not None else DEFAULT_FACTOR).check()

    def all_sets(self) -> list[str]:
        """``options`` and ``sets`` as ``[method.]option=value`` strings."""
        out = []
        for scope, table in self.options.items():
            for key, value in table.items():
                out.append(f"{'' if scope == '*' else scope + '.'}{key}={format_value(value)}")
        return out + list(self.sets)

    def generic_executor_settings(self) -> dict:
        """The generic executor settings given (translated by the executor into its own)."""
        return {f.name: getattr(self, f.name) for f in fields() if spec(f.name).table == "executor"
                and f.name not in ("executor", "fuse") and getattr(self, f.name) is not None}


def fields() -> list[dataclasses.Field]:
    """The declared fields of :class:`Sweep` (in declaration order)."""
    return [f for f in dataclasses.fields(Sweep) if "spec" in f.metadata]


def spec(name: str) -> Spec:
    return Sweep.__dataclass_fields__[name].metadata["spec"]


def flag_of(name: str) -> str | None:
    s = spec(name)
    if s.flag is None:
        return None
    return s.flag or "--" + name.replace("_", "-")


def key_of(name: str) -> str | None:
    s = spec(name)
    return None if s.key is None else (s.key or name)


def format_value(v: Any) -> str:
    """A sweep file's (or Python) value as a ``--set`` string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# checking a value against its declaration
# ---------------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    from ..tasks import parse_names  # commas inside VPT task names (`dsprites(a="x",b=16)`) do not split

    return parse_names(text)


def _number(s: Spec, x: Any, where: str, integer: bool) -> float | int:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SettingsError(f"{where}: {x!r} is not {'an integer' if integer else 'a number'}")
    if integer and (not float(x).is_integer() or isinstance(x, float) and not math.isfinite(x)):
        raise SettingsError(f"{where}: {x!r} is not an integer")
    if not math.isfinite(x):
        raise SettingsError(f"{where}: {x!r} is not a finite number")
    problem = bounds_problem(x, s.min, s.max)
    if problem:
        raise SettingsError(f"{where}: {x!r} {problem}")
    return int(x) if integer else float(x)


def _from_text(s: Spec, text: str, where: str) -> Any:
    """A command-line string as the kind's value."""
    try:
        if s.kind in ("int",):
            return int(text)
        if s.kind == "float":
            return float(text)
        if s.kind in ("names", "strings"):
            return _split(text)
        if s.kind == "ints":
            return [int(x) for x in text.split(",") if x.strip()]
        if s.kind == "numbers":
            return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SettingsError(f"{where}: cannot read {text!r} as {_kind_words(s)}") from None
    return text


def _kind_words(s: Spec) -> str:
    return {"str": "a string", "path": "a path", "int": "an integer", "float": "a number", "bool": "true or false",
            "names": "a list of names", "ints": "a list of integers", "numbers": "a number or a list of numbers",
            "table": "a table", "strings": "a list of strings"}[s.kind]


def check(name: str, value: Any, where: str, *, text: bool = False) -> Any:
    """``value`` of field ``name`` checked against its declaration (and normalised: names canonical, numbers as
    int/float, a number given for a list as a list); ``text``: a command-line string to read first."""
    s = spec(name)
    if value is None:
        if s.optional:
            return None
        raise SettingsError(f"{where}: a value is required ({_kind_words(s)})")
    if text and isinstance(value, str):
        value = _from_text(s, value, where)
    kind = s.kind
    if kind in ("str", "path"):
        if not isinstance(value, str) or (kind == "path" and not value):
            raise SettingsError(f"{where}: {value!r} is not {_kind_words(s)}")
    elif kind == "int":
        value = _number(s, value, where, True)
    elif kind == "float":
        value = _number(s, value, where, False)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: {value!r} is not true or false")
    elif kind in ("names", "strings", "ints", "numbers"):
        if isinstance(value, str) and kind in ("names", "strings"):
            value = _split(value) if kind == "names" else [value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and kind in ("ints", "numbers"):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: {value!r} is not {_kind_words(s)}")
        value = list(value)
        if kind in ("names", "strings") and not all(isinstance(x, str) and x.strip() for x in value):
            raise SettingsError(f"{where}: {value!r} is not {_kind_words(s)}")
        if kind in ("ints", "numbers"):
            value = [_number(s, x, where, kind == "ints") for x in value]
        if s.nonempty and not value:
            raise SettingsError(f"{where}: an empty list (give none at all for the default)")
        if s.max_items is not None and len(value) > s.max_items:
            raise SettingsError(f"{where}: {len(value)} items, more than the {s.max_items} allowed")
    elif kind == "table":
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: {value!r} is not a table")
        value = {k: dict(v) if isinstance(v, dict) else v for k, v in value.items()}
    if s.canonical is not None:
        try:
            value = [s.canonical(x) for x in value] if isinstance(value, list) else s.canonical(value)
        except PeftbenchError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    elif s.choices is not None:
        allowed = s.choice_names()
        for x in value if isinstance(value, list) else [value]:
            if x not in allowed:
                raise SettingsError(f"{where}: {x!r} is not one of {', '.join(map(str, allowed))}")
    return value


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def help_of(name: str, registries: bool = True) -> str:
    """A field's help: its text, its choices (a registry's names only with ``registries``: they depend on the
    plugins installed) and its default."""
    s = spec(name)
    text = s.help
    if s.choices is not None and (registries or not callable(s.choices)):
        try:
            text += f" ({' | '.join(map(str, s.choice_names()))})"
        except PeftbenchError:
            pass
    default = Sweep.__dataclass_fields__[name].default
    if default not in (None, dataclasses.MISSING) and not isinstance(default, bool):
        text += f"; default {format_value(default)}"
    return text.replace("%", "%%")


def add_arguments(parser) -> None:
    """The ``peftbench run`` flags of every declared field, in argument groups; their defaults are None (a
    flag that is not given leaves the sweep file's value, or the field's default)."""
    groups = {g: parser.add_argument_group(title) for g, title in GROUPS.items()}
    for f in fields():
        flag = flag_of(f.name)
        if flag is None:
            continue
        s = spec(f.name)
        g = groups[s.group]
        if s.kind == "bool":
            g.add_argument(flag, dest=f.name, action="store_const", const=not f.default, default=None,
                           help=help_of(f.name))
        elif s.kind == "strings":
            g.add_argument(flag, dest=f.name, action="append", default=None, metavar=s.metavar, help=help_of(f.name))
        else:
            g.add_argument(flag, dest=f.name, default=None, metavar=s.metavar or f.name.upper(), help=help_of(f.name))
    groups["execution"].add_argument("--executor-set", action="append", default=None, metavar="KEY=VALUE",
                                     help="a setting of the chosen executor (docs/executors.md), e.g. partition=gpu "
                                          "or address=ray://head:10001 (repeatable)")
    groups["execution"].add_argument("--executor-profile", metavar="FILE",
                                     help="a TOML file of the chosen executor's settings, read first (e.g. a SLURM "
                                          "cluster profile)")
    groups["tracking"].add_argument("--tracker-set", action="append", default=None, metavar="TRACKER.KEY=VALUE",
                                    help="a tracker setting, e.g. wandb.project=vit-peft (repeatable)")


def from_args(args, base: Sweep | None = None) -> Sweep:
    """The sweep of a command line: ``base`` (a sweep file's) with every flag that was given over it."""
    base = base or Sweep()
    changes: dict[str, Any] = {}
    for f in fields():
        flag = flag_of(f.name)
        raw = getattr(args, f.name, None) if flag else None
        if raw is None:
            continue
        if f.name == "sets":
            changes["sets"] = list(base.sets) + list(raw)
            continue
        try:
            changes[f.name] = check(f.name, raw, flag or f.name, text=True)
        except SettingsError:
            if f.name == "tasks":  # the suite's own tasks in the error, when the suite is known
                suite = getattr(args, "suite", None) or base.suite
                names = [t.strip() for t in str(raw).split(",")] if isinstance(raw, str) else raw
                _unknown_task_of_suite(suite, names, flag or "--tasks")
            raise
    if "methods" in changes and base.options:  # --methods narrows the file's: its options of other methods go
        from ..methods import get_method

        chosen = [get_method(m) for m in changes["methods"]]
        names = {m.name for m in chosen}
        options = {}
        for scope, table in base.options.items():
            if scope == "*":
                table = {k: v for k, v in table.items() if any(k in m.options for m in chosen)}
            elif scope not in names:
                continue
            if table:
                options[scope] = dict(table)
        changes["options"] = options
    if "seeds" in changes:
        changes.setdefault("num_seeds", None)
    elif "num_seeds" in changes:
        changes["seeds"] = None
    executor = changes.get("executor", base.executor)
    settings = {k: dict(v) for k, v in base.executor_settings.items()}
    if "executor" in changes and changes["executor"] != base.executor:
        settings = {}  # the file's settings are another executor's
    own = settings.setdefault(executor, {})
    if getattr(args, "executor_profile", None):
        own["profile"] = args.executor_profile
    for item in getattr(args, "executor_set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--executor-set {item!r}: expected KEY=VALUE")
        own[key.strip()] = toml_value(raw.strip())
    changes["executor_settings"] = {k: v for k, v in settings.items() if v}
    tracker_settings = {k: dict(v) for k, v in base.tracker_settings.items()}
    if "trackers" in changes:  # --tracker replaces the file's trackers: the file's settings of the others go
        tracker_settings = {k: v for k, v in tracker_settings.items() if k in changes["trackers"]}
    for item in getattr(args, "tracker_set", None) or []:
        key, sep, raw = item.partition("=")
        tracker, dot, opt = key.strip().partition(".")
        if not sep or not dot:
            raise SettingsError(f"--tracker-set {item!r}: expected TRACKER.KEY=VALUE, e.g. wandb.project=vit-peft")
        tracker_settings.setdefault(tracker, {})[opt] = toml_value(raw.strip())
    changes["tracker_settings"] = tracker_settings
    return base.replace(**changes)


# ---------------------------------------------------------------------------------------------
# the documentation
# ---------------------------------------------------------------------------------------------


def _bound(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def markdown_table() -> str:
    """The table of docs/sweep-files.md: every field with its sweep-file key, flag, kind, bounds and meaning."""
    lines = ["| sweep file | flag | Python | value | meaning |", "|---|---|---|---|---|"]
    for f in fields():
        s = spec(f.name)
        key = key_of(f.name)
        where = "—" if key is None else (f"`[{s.table}]` `{key}`" if s.table else f"`{key}`")
        if s.kind == "table" and f.name == "options":
            where = "`[options]`, `[options.<method>]`"
        elif s.kind == "table":
            where = f"`[{s.table or ('executor' if f.name == 'executor_settings' else 'tracking')}.<name>]`"
        flag = flag_of(f.name)
        value = _kind_words(s)
        limits = [f"≥ {_bound(s.min)}" if s.min is not None else "", f"≤ {_bound(s.max)}" if s.max is not None else ""]
        if any(limits):
            value += f" ({' '.join(b for b in limits if b)})"
        if s.max_items:
            value += f", at most {s.max_items:,} items"
        shown = f"`{flag}`" if flag else "—"
        lines.append(f"| {where} | {shown} | `{f.name}` | {value} | {help_of(f.name, registries=False).replace('%%', '%')} |")
    return "\n".join(lines)


def names(kinds: Iterable[str] = KINDS) -> list[str]:
    return [f.name for f in fields() if spec(f.name).kind in set(kinds)]
