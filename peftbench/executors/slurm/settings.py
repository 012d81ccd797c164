"""SLURM settings: defaults < profile (TOML) < ``--slurm-set KEY=VALUE`` < named flags; the
``peftbench run`` flags of ``--executor slurm``."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import SettingsError

# key: (accepted types, description). The profile may use exactly these keys.
PROFILE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "partition": ((str,), "partition (sbatch --partition); default: the cluster's default partition"),
    "account": ((str,), "account to charge (sbatch --account)"),
    "qos": ((str,), "quality of service (sbatch --qos)"),
    "constraint": ((str,), "node features, e.g. 'a100|h100' (sbatch --constraint)"),
    "gpus_per_node": ((int,), "GPUs per job; one run per GPU (0 = CPU jobs)"),
    "cpus_per_task": ((int,), "CPUs per job; also torch's thread count in the job"),
    "mem_gb": ((int, float), "memory per job in GB"),
    "timeout_min": ((int,), "time limit per job in minutes; a job that reaches it is checkpointed and requeued"),
    "array_parallelism": ((int,), "at most this many tasks of a stage's array run at once"),
    "pack": ((int,), "runs per array task: >1 packs several short runs (search trials) into one job"),
    "max_retries": ((int,), "resubmissions per run and driver invocation when its job dies without a result"),
    "signal_delay_s": ((int,), "seconds before the time limit at which SLURM signals the job to checkpoint"),
    "max_num_timeout": ((int,), "requeues after reaching the time limit (submitit's slurm_max_num_timeout)"),
    "additional_parameters": ((dict,), "extra sbatch arguments {name = value} (submitit slurm_additional_parameters)"),
    "setup": ((list,), "shell lines run in the job script before python, e.g. 'module load cuda' (slurm_setup)"),
    "python": ((str,), "command that runs python in the job (default: this interpreter), e.g. for containers"),
    "job_name": ((str,), "job name prefix (the stage is appended)"),
    "folder": ((str,), "submitit folder for job scripts, pickles and logs (default <runs-dir>/.slurm/logs)"),
    "poll_s": ((int, float), "seconds between two looks at the queue"),
    "device": ((str,), "device inside the job: auto (cuda when available, else cpu), cuda, cuda:N or cpu"),
    "cluster": ((str,), "submitit backend: slurm; local or debug run the jobs on this machine (testing)"),
}


@dataclass
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float = 32.0
    timeout_min: int = 240
    array_parallelism: int = 64
    pack: int = 1
    max_retries: int = 2
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    additional_parameters: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    python: str | None = None
    job_name: str = "peftbench"
    folder: str | None = None
    poll_s: float = 15.0
    device: str = "auto"
    cluster: str = "slurm"
    sources: dict = field(default_factory=dict, repr=False)  # key -> where its value came from

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("partition", "account", "qos", "constraint")
                 if getattr(self, k)]
        parts += [f"gpus_per_node={self.gpus_per_node}", f"cpus_per_task={self.cpus_per_task}",
                  f"mem_gb={self.mem_gb:g}", f"timeout_min={self.timeout_min}",
                  f"array_parallelism={self.array_parallelism}", f"pack={self.pack}",
                  f"max_retries={self.max_retries}"]
        if self.additional_parameters:
            parts.append("sbatch: " + " ".join(f"--{k.replace('_', '-')}={v}"
                                               for k, v in sorted(self.additional_parameters.items())))
        if self.cluster != "slurm":
            parts.append(f"cluster={self.cluster}")
        return ", ".join(parts)


def _check_value(key: str, value: Any, where: str) -> Any:
    if key not in PROFILE_KEYS:
        raise SettingsError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(PROFILE_KEYS))})")
    types, _ = PROFILE_KEYS[key]
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join("number" if t is float else {"int": "integer", "str": "string", "dict": "table",
                                                         "list": "list of strings"}[t.__name__] for t in types)
        raise SettingsError(f"{where}: key {key!r} must be a {want}, got {value!r}")
    if key == "setup" and not all(isinstance(x, str) for x in value):
        raise SettingsError(f"{where}: key 'setup' must be a list of strings, got {value!r}")
    if key == "additional_parameters":
        for k, v in value.items():
            if not isinstance(v, (str, int, float, bool)):
                raise SettingsError(f"{where}: additional_parameters.{k} must be a string, number or boolean, got {v!r}")
    if key == "mem_gb":
        value = float(value)
    return value


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise SettingsError("SLURM profiles need Python >= 3.11 (tomllib) or the tomli package") from None
    return tomllib


def read_profile(path: str | Path) -> dict:
    """The keys of a TOML cluster profile, checked (an unknown key is an error naming file and key)."""
    tomllib = _tomllib()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"--slurm-profile {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--slurm-profile {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"--slurm-profile {path}: not valid TOML ({exc})") from None
    return {k: _check_value(k, v, f"profile {path}") for k, v in data.items()}


def _parse_set(item: str, flag: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SettingsError(f"{flag} {item!r}: expected KEY=VALUE")
    key, raw = (x.strip() for x in item.split("=", 1))
    return key, _toml_value(raw)


def _toml_value(raw: str) -> Any:
    """A TOML literal (10, 2.5, true, "x", ["a"]); anything else is a plain string."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# (argparse dest, profile key) of the named flags (add_arguments below)
FLAG_KEYS = {
    "slurm_partition": "partition", "slurm_account": "account", "slurm_qos": "qos",
    "slurm_constraint": "constraint", "slurm_gpus": "gpus_per_node", "slurm_cpus": "cpus_per_task",
    "slurm_mem_gb": "mem_gb", "slurm_timeout_min": "timeout_min",
    "slurm_array_parallelism": "array_parallelism", "slurm_max_retries": "max_retries", "pack": "pack",
}


def make_settings(profile: str | Path | None = None, sets: list[str] = (), flags: dict | None = None,
                  extra_args: list[str] = (), setup: list[str] = (), table: dict | None = None,
                  where=None) -> SlurmSettings:
    """Defaults < profile < a sweep file's ``[executor.slurm]`` table < ``--slurm-set`` < named flags;
    ``--slurm-arg`` / ``--slurm-setup`` add to the profile's ``additional_parameters`` / ``setup``.
    ``where(key)``: where a key of ``table`` is (file and line), for error messages."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if profile:
        for k, v in read_profile(profile).items():
            values[k], sources[k] = v, str(profile)
    for k, v in (table or {}).items():
        at = where(k) if where else "[executor.slurm]"
        if k in PROFILE_KEYS and float in PROFILE_KEYS[k][0] and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        values[k], sources[k] = _check_value(k, v, at), at
    for item in sets:
        k, v = _parse_set(item, "--slurm-set")
        if k in PROFILE_KEYS and float in PROFILE_KEYS[k][0] and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        values[k], sources[k] = _check_value(k, v, f"--slurm-set {item!r}"), "--slurm-set"
    for k, v in (flags or {}).items():
        if v is not None:
            values[k], sources[k] = _check_value(k, float(v) if k == "mem_gb" else v, f"--{k}"), "flag"
    extra = dict(values.get("additional_parameters") or {})
    for item in extra_args:
        k, v = _parse_set(item, "--slurm-arg")
        extra[k.lstrip("-")] = v
    if extra:
        values["additional_parameters"] = _check_value("additional_parameters", extra, "--slurm-arg")
    if setup:
        values["setup"] = list(values.get("setup") or []) + list(setup)
    s = SlurmSettings(**values)
    s.sources = sources
    _validate(s)
    return s


def _validate(s: SlurmSettings) -> None:
    for key, low in (("gpus_per_node", 0), ("cpus_per_task", 1), ("timeout_min", 1), ("array_parallelism", 1),
                     ("pack", 1), ("max_retries", 0), ("signal_delay_s", 0), ("max_num_timeout", 0)):
        if getattr(s, key) < low:
            raise SettingsError(f"SLURM setting {key}={getattr(s, key)} ({s.sources.get(key, 'default')}): must be >= {low}")
    if s.mem_gb <= 0 or s.poll_s <= 0:
        raise SettingsError("SLURM settings mem_gb and poll_s must be > 0")
    if s.cluster not in ("slurm", "local", "debug"):
        raise SettingsError(f"SLURM setting cluster={s.cluster!r}: expected slurm, local or debug")
    if s.signal_delay_s >= s.timeout_min * 60:
        raise SettingsError(f"SLURM settings: signal_delay_s={s.signal_delay_s} must be well below timeout_min*60 "
                     f"({s.timeout_min * 60}); SLURM may signal up to 60 s earlier still")
    if s.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", s.device):
        raise SettingsError(f"SLURM setting device={s.device!r}: expected auto, cpu, cuda or cuda:N")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``--executor slurm`` (an argument group of ``peftbench run``)."""
    g = p.add_argument_group("SLURM", "with --executor slurm (docs/slurm.md); flags override --slurm-profile")
    g.add_argument("--slurm-profile", metavar="FILE", help="TOML cluster profile (scripts/slurm/profile.example.toml)")
    g.add_argument("--slurm-partition", metavar="NAME")
    g.add_argument("--slurm-account", metavar="NAME")
    g.add_argument("--slurm-qos", metavar="NAME")
    g.add_argument("--slurm-constraint", metavar="FEATURES")
    g.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job, one run per GPU (default 1; 0: CPU jobs)")
    g.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per job (default 8)")
    g.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory per job (default 32)")
    g.add_argument("--slurm-timeout-min", type=int, metavar="MIN",
                   help="time limit per job; then checkpoint + requeue (default 240)")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="tasks of an array running at once (default 64)")
    g.add_argument("--slurm-max-retries", type=int, metavar="N", help="resubmissions of a run whose job died (default 2)")
    g.add_argument("--pack", type=int, metavar="N",
                   help="runs per job: pack N short runs (search trials) into one job (default 1)")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="extra sbatch argument, e.g. --slurm-arg exclude=node07 (repeatable)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before python, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-set", action="append", default=[], metavar="KEY=VALUE", help="any profile key (repeatable)")


def given_flags(args) -> list[str]:
    """The SLURM flags the command line set."""
    given = [f"--{d.replace('_', '-')}" for d in FLAG_KEYS if getattr(args, d, None) is not None]
    given += [f for f, v in (("--slurm-profile", getattr(args, "slurm_profile", None)),
                             ("--slurm-set", getattr(args, "slurm_set", None)),
                             ("--slurm-arg", getattr(args, "slurm_arg", None)),
                             ("--slurm-setup", getattr(args, "slurm_setup", None))) if v]
    return given


def configure(table: dict, args, where) -> dict:
    """The resolved SLURM settings of a sweep as plain data: defaults < profile (``--slurm-profile``, or the
    table's ``profile`` key) < the sweep file's ``[executor.slurm]`` table < the command line's flags."""
    table = dict(table or {})
    profile = table.pop("profile", None)
    if profile is not None and not isinstance(profile, str):
        raise SettingsError(f"{where('profile')}: 'profile' must be the path of a TOML cluster profile")
    if args is not None and getattr(args, "slurm_profile", None):
        profile = args.slurm_profile
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()} if args is not None else {}
    s = make_settings(profile, (getattr(args, "slurm_set", None) or []) if args is not None else [], flags,
                      (getattr(args, "slurm_arg", None) or []) if args is not None else [],
                      (getattr(args, "slurm_setup", None) or []) if args is not None else [], table=table, where=where)
    if args is not None and getattr(args, "device", None):
        s.device = args.device
        _validate(s)
    return {k: v for k, v in _asdict(s).items() if v is not None}


def _asdict(s: SlurmSettings) -> dict:
    import dataclasses

    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "sources"}


def from_config(settings: dict) -> SlurmSettings:
    """The :class:`SlurmSettings` of :func:`configure`'s plain data."""
    s = SlurmSettings(**{k: v for k, v in settings.items() if k in PROFILE_KEYS})
    _validate(s)
    return s


def settings_from_args(args) -> SlurmSettings | None:
    """The SLURM settings of ``peftbench run`` (None for another executor, where SLURM flags are an error)."""
    if getattr(args, "executor", "local") != "slurm":
        given = given_flags(args)
        if given:
            raise SettingsError(f"{', '.join(given)} only apply with --executor slurm")
        return None
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    s = make_settings(args.slurm_profile, args.slurm_set or [], flags, args.slurm_arg or [], args.slurm_setup or [])
    if getattr(args, "device", None):
        s.device = args.device
        _validate(s)
    return s
