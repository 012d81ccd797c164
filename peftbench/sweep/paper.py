"""``--protocol paper``: every method trained with the recipe of the paper its reference row comes from.

A paper's recipe is data: one TOML file per paper in ``methods/papers/`` (installed as
``peftbench.methods/papers``), read by :func:`recipes`. Every value carries where it comes from: a
``source`` (``code:<path>:<lines>`` is expanded to the paper's ``repository@commit``, or a paper's table), or
``unpublished`` (the choice made and why, when nobody published the value). docs/protocols.md §15 describes
the format; each file's own comments say what was read.

A card resolves, for one (method, suite, task), in this order (later wins): the file's ``[hparams]``, its
``[suites.<suite>]``, the method's ``[methods.<m>]``, the method's ``[methods.<m>.suites.<suite>]``, then the
per-task tables (``[tasks.<suite>]`` and ``[methods.<m>.tasks.<suite>]``). The result (:class:`Resolved`):

* the hyper-parameters of the search runs and of the final runs (an entry's ``search`` value applies to
  the search runs only, e.g. E^2VPT's FGVC search keeps the best epoch);
* the selection: ``fixed`` (the published values; final runs only) or ``search`` (the paper's grid on the
  search splits, its tie rule), and the seeds;
* the method's options (per task where published), the departures that peftbench does not reproduce yet,
  and every value's source, which go into each run's ``spec.option_sources``.

Anything the command line sets (``--lr``, ``--epochs``, ``--set``, ``--seeds``...) still wins, and the
record says so: the run is then the paper's recipe with that change.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from ..errors import SettingsError
from ..train.hparams import RECIPE_KEYS, parse_hparams
from .protocols import EvalProtocol, PlanContext, register_protocol
from .stages import search_then_final

if TYPE_CHECKING:
    from ..methods import Method

SCHEMA = 1
RULES = ("fixed", "search")
# how a search's ties are broken: the smaller / larger lr first (then the earlier grid point), or the later grid point
# (a stable sort whose last element is taken, e.g. PETL_Vision's sorted(...)[-1])
TIES = ("smaller-lr", "larger-lr", "later-point")
# hyper-parameter keys a card may set (HParams fields; lr and wd only for a fixed selection)
HPARAM_KEYS = RECIPE_KEYS
ENTRY_KEYS = {"value", "source", "unpublished", "search", "note"}


def papers_dir() -> Path:
    return Path(str(resources.files("peftbench.methods") / "papers"))


@dataclass(frozen=True)
class Value:
    """One value of a card and where it comes from."""

    value: Any
    source: str  # a citation, or "unpublished: <the choice made and why>"
    search: Any = None  # the value of the search runs, when it differs
    has_search: bool = False

    @property
    def published(self) -> bool:
        return not self.source.startswith("unpublished")


@dataclass(frozen=True)
class Card:
    """One paper's recipe file, parsed and checked (:func:`read_card`)."""

    name: str
    path: Path
    title: str
    code: str
    reference: str
    methods: tuple[str, ...]
    suites: tuple[str, ...]
    raw: dict = field(repr=False, compare=False, hash=False, default_factory=dict)

    def where(self, line: str) -> str:
        return f"{self.path.name}: {line}"


@dataclass
class Resolved:
    """A card resolved for one (method, suite, task)."""

    card: Card
    rule: str
    tie: str
    hparams: dict[str, Value]
    grid: dict[str, Value]  # lr_grid, wd_grid (rule search)
    seeds: Value
    options: dict[str, Value]
    departures: dict[str, str]

    def values(self, role: str) -> dict[str, Any]:
        """The hyper-parameters of the ``search`` or ``final`` runs."""
        return {k: (v.search if role == "search" and v.has_search else v.value) for k, v in self.hparams.items()}

    def sources(self) -> dict[str, str]:
        """Every value's citation, keyed as the run records show them (``paper.<key>``)."""
        out = {"paper": f"{self.card.title} ({self.card.path.name}; code {self.card.code})",
               "paper.card": self.card.name,  # the recipe a leaderboard row names (like-for-like comparisons)
               "paper.selection": f"{self.rule}" + (f", tie {self.tie}" if self.rule == "search" else "")}
        for group in (self.hparams, self.grid, self.options):
            for k, v in group.items():
                shown = v.value if not v.has_search else f"{v.value} (search runs: {v.search})"
                out[f"paper.{k}"] = f"{shown}: {v.source}"
        out["paper.seeds"] = f"{list(self.seeds.value)}: {self.seeds.source}"
        for k, why in self.departures.items():
            out[f"paper.departure.{k}"] = why
        return out


def _expand(card_code: str, source: str) -> str:
    """``code:<path>`` anywhere in a source (not inside a word or a path) names the paper's repository@commit."""
    return re.sub(r"(?<![\w/.-])code:", f"{card_code}:", source)


def _entry(card: Card, where: str, raw: Any) -> Value:
    if not isinstance(raw, dict) or "value" not in raw:
        raise SettingsError(card.where(f"{where}: expected {{ value = ..., source = \"...\" }} (or unpublished = "
                                       f"\"...\" instead of source), got {raw!r}"))
    unknown = set(raw) - ENTRY_KEYS
    if unknown:
        raise SettingsError(card.where(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: "
                                       f"{', '.join(sorted(ENTRY_KEYS))})"))
    if ("source" in raw) == ("unpublished" in raw):
        raise SettingsError(card.where(f"{where}: give exactly one of source (where the value comes from) or "
                                       "unpublished (why nobody published it, and the choice made)"))
    source = _expand(card.code, str(raw["source"])) if "source" in raw else f"unpublished: {raw['unpublished']}"
    if "note" in raw:
        source += f" ({raw['note']})"
    if not source.strip() or source.strip() == "unpublished:":
        raise SettingsError(card.where(f"{where}: an empty source"))
    return Value(raw["value"], source, raw.get("search"), "search" in raw)


def _table(card: Card, where: str, raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise SettingsError(card.where(f"{where}: expected a table, got {raw!r}"))
    return raw


def _hparams(card: Card, where: str, raw: dict) -> dict[str, Value]:
    out = {}
    for k, v in _table(card, where, raw).items():
        if k not in HPARAM_KEYS:
            close = difflib.get_close_matches(k, HPARAM_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(card.where(f"{where}.{k}: not a hyper-parameter a card may set{hint} (known: "
                                           f"{', '.join(HPARAM_KEYS)})"))
        out[k] = _entry(card, f"{where}.{k}", v)
    return out


def read_card(path: Path) -> Card:
    """The card at ``path``, its structure checked (every value cited); values are checked when resolved."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SettingsError(f"{path}: cannot read this paper recipe: {exc}") from None
    stub = Card(path.stem, path, "", "", "", (), ())
    if raw.get("schema") != SCHEMA:
        raise SettingsError(stub.where(f"schema = {raw.get('schema')!r}: this peftbench reads schema {SCHEMA}"))
    paper = _table(stub, "[paper]", raw.get("paper"))
    for key in ("title", "code", "reference"):
        if not isinstance(paper.get(key), str) or not paper[key].strip():
            raise SettingsError(stub.where(f"[paper].{key}: missing (a paper recipe says what it reproduces)"))
    if "@" not in paper["code"]:
        raise SettingsError(stub.where(f"[paper].code = {paper['code']!r}: expected owner/repository@commit"))
    methods = _table(stub, "[methods]", raw.get("methods"))
    suites = paper.get("suites")
    if not isinstance(suites, list) or not suites or not all(isinstance(s, str) for s in suites):
        raise SettingsError(stub.where("[paper].suites: the suites this recipe covers, e.g. [\"vtab\"]"))
    card = Card(path.stem, path, paper["title"], paper["code"], paper["reference"], tuple(methods), tuple(suites), raw)
    known = {"schema", "paper", "selection", "seeds", "hparams", "suites", "methods", "tasks", "departures"}
    unknown = set(raw) - known
    if unknown:
        raise SettingsError(card.where(f"unknown table(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"))
    for m in card.methods:  # structure of every layer, so a broken card fails when read, not mid-sweep
        for s in card.suites:
            for t in _task_names(card, m, s):
                resolve_card(card, m, s, t)
    return card


def _task_names(card: Card, method: str, suite: str) -> list[str]:
    names: set[str] = set()
    for table in (card.raw.get("tasks", {}).get(suite, {}),
                  card.raw["methods"][method].get("tasks", {}).get(suite, {}) if isinstance(
                      card.raw["methods"][method], dict) else {}):
        names |= {k for k in table if k not in ("columns", "source")}
    return sorted(names) or [""]


def _layers(card: Card, method: str, suite: str) -> list[tuple[str, dict]]:
    raw = card.raw
    m = _table(card, f"[methods.{method}]", raw["methods"][method])
    layers = [("", raw), (f"[suites.{suite}]", raw.get("suites", {}).get(suite, {})),
              (f"[methods.{method}]", m), (f"[methods.{method}.suites.{suite}]", m.get("suites", {}).get(suite, {}))]
    return [(w, _table(card, w or "top level", t)) for w, t in layers]


def _per_task(card: Card, where: str, table: Any, task: str) -> dict[str, Value]:
    """The values of ``task`` in a per-task table (``columns``, ``source``, one row per task)."""
    table = _table(card, where, table)
    columns, source = table.get("columns"), table.get("source")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) or not isinstance(source, str):
        raise SettingsError(card.where(f"{where}: a per-task table needs columns = [...] and source = \"...\""))
    row = table.get(task)
    if row is None:
        return {}
    if not isinstance(row, list) or len(row) != len(columns):
        raise SettingsError(card.where(f"{where}.{task}: expected {len(columns)} values ({', '.join(columns)}), "
                                       f"got {row!r}"))
    src = _expand(card.code, source).replace("{task}", task)
    return {c: Value(v, src) for c, v in zip(columns, row)}


def resolve_card(card: Card, method: str, suite: str, task: str) -> Resolved:
    """``card`` for one (method, suite, task): later layers win (module docstring)."""
    if method not in card.methods:
        raise SettingsError(card.where(f"does not cover method {method!r} (it covers {', '.join(card.methods)})"))
    hparams: dict[str, Value] = {}
    grid: dict[str, Value] = {}
    options: dict[str, Value] = {}
    departures: dict[str, str] = {}
    rule = tie = None
    seeds = None
    for where, layer in _layers(card, method, suite):
        hparams.update(_hparams(card, f"{where}[hparams]", layer.get("hparams", {})))
        sel = _table(card, f"{where}[selection]", layer.get("selection", {}))
        for k, v in sel.items():
            if k == "rule":
                rule = _entry(card, f"{where}[selection].rule", v)
            elif k == "tie":
                tie = _entry(card, f"{where}[selection].tie", v)
            elif k in ("lr_grid", "wd_grid"):
                grid[k] = _entry(card, f"{where}[selection].{k}", v)
            else:
                raise SettingsError(card.where(f"{where}[selection].{k}: unknown (rule, tie, lr_grid, wd_grid)"))
        if "seeds" in layer:
            seeds = _entry(card, f"{where}[seeds]", layer["seeds"])
        for k, v in _table(card, f"{where}[options]", layer.get("options", {})).items():
            options[k] = _entry(card, f"{where}[options].{k}", v)
        for k, v in _table(card, f"{where}[departures]", layer.get("departures", {})).items():
            if not isinstance(v, str) or not v.strip():
                raise SettingsError(card.where(f"{where}[departures].{k}: say what the paper does that peftbench "
                                               "does not (yet)"))
            departures[k] = v
    m = card.raw["methods"][method]
    for where, table in ((f"[tasks.{suite}]", card.raw.get("tasks", {}).get(suite)),
                         (f"[methods.{method}.tasks.{suite}]", m.get("tasks", {}).get(suite))):
        if table is None or not task:
            continue
        for k, v in _per_task(card, where, table, task).items():
            if k.startswith("option:"):
                options[k[7:]] = v
            elif k in HPARAM_KEYS:
                hparams[k] = v
            elif k == "seed":  # one seed per task (a paper whose configs each name their own)
                seeds = Value([v.value], v.source)
            else:
                raise SettingsError(card.where(f"{where}: column {k!r} is neither a hyper-parameter, seed nor "
                                               "option:<name>"))
    if rule is None or rule.value not in RULES:
        raise SettingsError(card.where(f"[selection].rule for {method} on {suite}: one of {', '.join(RULES)}"))
    if seeds is None or not isinstance(seeds.value, list) or not seeds.value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds.value):
        raise SettingsError(card.where(f"[seeds] for {method} on {suite}: {{ value = [42, ...], source = ... }}"))
    if rule.value == "search":
        for k in ("lr_grid", "wd_grid"):
            v = grid.get(k)
            if v is None or not isinstance(v.value, list) or not v.value:
                raise SettingsError(card.where(f"[selection].{k} for {method} on {suite}: a search needs its grid"))
        if tie is None or tie.value not in TIES:
            raise SettingsError(card.where(f"[selection].tie for {method} on {suite}: one of {', '.join(TIES)}"))
        for k in ("lr", "wd"):
            if k in hparams:
                raise SettingsError(card.where(f"[hparams].{k} for {method} on {suite}: a search chooses it"))
    else:
        for k in ("lr", "wd"):
            if k not in hparams:
                raise SettingsError(card.where(f"[hparams].{k} for {method} on {suite}{' / ' + task if task else ''}: "
                                               "a fixed recipe gives it"))
    res = Resolved(card, str(rule.value), str(tie.value) if tie else "smaller-lr", hparams, grid, seeds, options,
                   departures)
    for role in ("search", "final"):
        hp = {"lr": 0.0, "wd": 0.0, **res.values(role)}
        try:
            parse_hparams(hp, where=f"{card.path.name}, {method} on {suite}{' / ' + task if task else ''}")
        except SettingsError as exc:
            raise SettingsError(f"{card.path}: {exc}") from None
    return res


_EXTRA: list[Path] = []  # cards added with add_card (a plugin's own papers, a test's)


def add_card(path: str | Path) -> Card:
    """Add a paper recipe from outside ``methods/papers/`` (a plugin's method, a suite of one's own); it is read and
    checked now, and a (method, suite) pair it shares with another card is an error."""
    card = read_card(Path(path))
    _EXTRA.append(Path(path))
    recipes.cache_clear()
    try:
        recipes()
    except SettingsError:
        _EXTRA.pop()
        recipes.cache_clear()
        raise
    return card


@lru_cache(maxsize=None)
def recipes() -> dict[tuple[str, str], Card]:
    """(method name, suite name) -> the card of the paper whose reference rows the method has on that suite
    (one paper per method and suite)."""
    out: dict[tuple[str, str], Card] = {}
    folder = papers_dir()
    paths = (sorted(folder.glob("*.toml")) if folder.is_dir() else []) + list(_EXTRA)
    for path in paths:
        card = read_card(path)
        for m in card.methods:
            for suite in card.suites:
                if (m, suite) in out:
                    raise SettingsError(f"{path}: method {m!r} on suite {suite!r} is already in {out[m, suite].path} "
                                        "(one paper per method and suite)")
                out[m, suite] = card
    return out


def card_for(method: "Method", suite: str) -> Card:
    card = recipes().get((method.name, suite))
    if card is None:
        theirs = sorted(s for (m, s) in recipes() if m == method.name)
        have = f"it has one on {', '.join(theirs)}" if theirs else \
            f"methods/papers/*.toml cover: {', '.join(sorted({m for m, _ in recipes()}))}"
        raise SettingsError(f"--protocol paper: method {method.name!r} has no paper recipe on suite {suite!r} ({have}); "
                            "use --protocol vpt or fixed for it")
    return card


@register_protocol
class PaperProtocol(EvalProtocol):
    """Each method's own paper recipe (``methods/papers/*.toml``): per task, cited, with the paper's selection
    rule and seeds (:mod:`peftbench.sweep.paper`)."""

    name = "paper"
    description = "each method's own paper recipe (methods/papers/*.toml): its per-task values, selection and seeds"

    def card(self, ctx: PlanContext) -> Card:
        """The card that holds this pair's recipe (the paper's)."""
        return card_for(ctx.method, ctx.suite.name)

    def adapt(self, ctx: PlanContext) -> PlanContext:
        card = self.card(ctx)
        res = resolve_card(card, ctx.method.name, ctx.suite.name, ctx.task.name)
        sources = {**ctx.option_sources, **res.sources()}
        options = dict(ctx.options)
        given = set(ctx.given_options)
        for k, v in res.options.items():
            if k in given:
                sources[f"paper.{k}"] += " [replaced by --set]"
                continue
            option = ctx.method.options.get(k)
            if option is None:
                raise SettingsError(card.where(f"[options].{k}: method {ctx.method.name!r} has no option {k!r}"))
            try:
                options[k] = option.parse(k, v.value)
            except Exception as exc:  # noqa: BLE001 - the method's own message, with the card's file
                raise SettingsError(card.where(f"[options].{k} = {v.value!r}: {exc}")) from None
        if res.options:
            options, resolved = ctx.method.resolve_options(options, ctx.task)
            sources.update(resolved)
        seeds = ctx.seeds
        if ctx.seeds_given != "seeds":
            base = tuple(res.seeds.value)
            n = len(ctx.seeds) if ctx.seeds_given == "num_seeds" else len(base)
            seeds = base[:n] if n <= len(base) else base + tuple(range(1000, 1000 + n - len(base)))
        for k in ("lr_grid", "wd_grid", "epochs", "batch_size", "warmup_epochs", "optimizer", "eval_every"):
            if ctx.overrides.get(k):
                sources[f"paper.override.{k}"] = f"{ctx.overrides[k]}: given on the command line (not the paper's)"
        return dataclasses.replace(ctx, options=options, option_sources=sources, seeds=seeds,
                                   protocol_data={"paper": res})

    def _res(self, ctx: PlanContext) -> Resolved:
        res = ctx.protocol_data.get("paper")
        if res is None:  # planned without adapt (a method's own pipeline always gets an adapted context)
            res = resolve_card(self.card(ctx), ctx.method.name, ctx.suite.name, ctx.task.name)
        return res

    def default_precision(self, device_type: str) -> str:
        return "fp32"  # the card's precision, when it has one, is a hyper-parameter (base_hparams)

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        res = self._res(ctx)
        hp = {k: v for k, v in res.values(stage_role).items() if k not in ("lr", "wd")}
        hp.setdefault("eval_every", 1 if stage_role == "search" else 0)
        if ctx.precision != "fp32":  # --precision given: it replaces the card's
            hp["precision"] = ctx.precision
        for k in ("epochs", "batch_size", "warmup_epochs", "optimizer", "eval_every"):
            if ctx.overrides.get(k) is not None:
                hp[k] = ctx.overrides[k]
        if hp.get("precision") == "fp32":
            del hp["precision"]  # absent means fp32 (run keys of fp32 runs predate the field)
        return hp

    def search_points(self, ctx: PlanContext) -> list[dict]:
        res = self._res(ctx)
        if res.rule == "fixed":
            final = res.values("final")
            lrs = ctx.overrides.get("lr_grid") or (final["lr"],)
            wds = ctx.overrides.get("wd_grid") or (final["wd"],)
            return [{"lr": float(lrs[0]), "wd": float(wds[0])}]
        lrs = ctx.overrides.get("lr_grid") or res.grid["lr_grid"].value
        wds = ctx.overrides.get("wd_grid") or res.grid["wd_grid"].value
        return [{"lr": float(lr), "wd": float(wd)} for lr in lrs for wd in wds]

    def tie(self, ctx: PlanContext, points: list[dict]):
        """The paper's tie rule on grid positions (smaller or larger lr first, or the later grid point)."""
        rule = self._res(ctx).tie
        if rule == "later-point":
            return lambda i: (-i,)
        sign = 1.0 if rule == "smaller-lr" else -1.0
        return lambda i: (sign * float(points[i]["lr"]),)

    def pipeline(self, ctx):
        points = self.search_points(ctx)
        yield from search_then_final(ctx, points, self.base_hparams(ctx, "search"), self.base_hparams(ctx, "final"),
                                     ctx.spec, tie=self.tie(ctx, points))

    def least_runs(self, grid: int, seeds: int) -> int:
        return seeds  # at least the final runs (a fixed recipe); a searched one adds its grid

    def describe(self, contexts: list[PlanContext]) -> list[str]:
        """Per method: its paper, then every value of its recipe with its source: once when every task has the
        same, else per task."""
        lines: list[str] = []
        by_method: dict[str, list[PlanContext]] = {}
        for c in contexts:
            by_method.setdefault(c.method.name, []).append(c)
        for name, ctxs in by_method.items():
            res = self._res(ctxs[0])
            seeds = {c.task.name: list(c.seeds) for c in ctxs}
            shown_seeds = (str(next(iter(seeds.values()))) if len({str(v) for v in seeds.values()}) == 1 else
                           "per task: " + ", ".join(f"{t} {v}" for t, v in seeds.items()))
            lines.append(f"{name}: the recipe of {res.card.title} ({res.card.path.name}); seeds {shown_seeds}")
            keys = sorted({k for c in ctxs for k in c.option_sources
                           if (k.startswith("paper.") and k != "paper") or k in res.options})
            for k in keys:
                values = {c.task.name: c.option_sources.get(k, "(not set)") for c in ctxs}
                shown = k.removeprefix("paper.")
                if len(set(values.values())) == 1:
                    lines.append(f"  {shown}: {next(iter(values.values()))}")
                else:
                    lines.append(f"  {shown}, per task:")
                    lines += [f"    {t}: {v}" for t, v in values.items()]
        return lines


@lru_cache(maxsize=64)
def _card_file(path: str, mtime: float) -> Card:
    return read_card(Path(path))


@register_protocol
class CardProtocol(PaperProtocol):
    """``--protocol card --card FILE``: the per-task configurations of a card file (one written by ``peftbench
    cards``, a colleague's, a paper's released values) trained as given: the paper protocol's machinery on a
    card named on the command line instead of the shipped papers."""

    name = "card"
    description = "the per-task configurations of --card FILE (e.g. from `peftbench cards`), trained as given"
    uses_card = True

    def card(self, ctx: PlanContext) -> Card:
        if not ctx.card:
            raise SettingsError("--protocol card: give the card file with --card FILE (`peftbench cards` writes one)")
        path = Path(ctx.card)
        try:
            card = _card_file(str(path), path.stat().st_mtime)
        except OSError as exc:
            raise SettingsError(f"--card {path}: cannot read it ({exc.strerror or exc})") from None
        if ctx.method.name not in card.methods:
            raise SettingsError(card.where(f"has no recipe for method {ctx.method.name!r} (it has "
                                           f"{', '.join(card.methods)})"))
        if ctx.suite.name not in card.suites:
            raise SettingsError(card.where(f"covers suite(s) {', '.join(card.suites)}, not {ctx.suite.name!r}"))
        return card
