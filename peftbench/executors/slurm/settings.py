"""SLURM settings: each one declared (:data:`SETTINGS`), the generic executor settings they translate
(:data:`GENERIC`), the :class:`SlurmSettings` the driver uses and the checks that involve several of them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import SettingsError
from .._base import Setting

# every SLURM setting: a profile, the sweep file's [executor.slurm] table and --executor-set take exactly these keys
SETTINGS: dict[str, Setting] = {
    "partition": Setting((str,), "partition (sbatch --partition); default: the cluster's default partition"),
    "account": Setting((str,), "account to charge (sbatch --account)"),
    "qos": Setting((str,), "quality of service (sbatch --qos)"),
    "constraint": Setting((str,), "node features, e.g. 'a100|h100' (sbatch --constraint)"),
    "gpus_per_node": Setting((int,), "GPUs per job; one run per GPU (0 = CPU jobs)", min=0, max=64),
    "cpus_per_task": Setting((int,), "CPUs per job; also torch's thread count in the job", min=1, max=4096),
    "mem_gb": Setting((float, int), "memory per job in GB", min=0.001, max=1e6),
    "timeout_min": Setting((int,), "time limit per job in minutes; a job that reaches it is checkpointed and requeued",
                           min=1, max=60 * 24 * 366),
    "array_parallelism": Setting((int,), "at most this many tasks of a stage's array run at once", min=1, max=100_000),
    "pack": Setting((int,), "runs per array task: >1 packs several short runs (search trials) into one job", min=1,
                    max=10_000),
    "max_retries": Setting((int,), "resubmissions per run and driver invocation when its job dies without a result",
                           min=0, max=1000),
    "signal_delay_s": Setting((int,), "seconds before the time limit at which SLURM signals the job to checkpoint",
                              min=0, max=86_400),
    "max_num_timeout": Setting((int,), "requeues after reaching the time limit (submitit's slurm_max_num_timeout)",
                               min=0, max=1000),
    "additional_parameters": Setting((dict,), "extra sbatch arguments {name = value} (submitit "
                                              "slurm_additional_parameters), e.g. {exclude = \"node07\"}"),
    "setup": Setting((list,), "shell lines run in the job script before python, e.g. ['module load cuda'] (slurm_setup)"),
    "python": Setting((str,), "command that runs python in the job (default: this interpreter), e.g. for containers"),
    "job_name": Setting((str,), "job name prefix (the stage is appended)"),
    "folder": Setting((str,), "submitit folder for job scripts, payloads and logs (default <runs-dir>/.slurm/logs)"),
    "poll_s": Setting((float, int), "seconds between two looks at the queue", min=0.001, max=86_400),
    "device": Setting((str,), "device inside the job: auto (cuda when available, else cpu), cuda, cuda:N or cpu"),
    "cluster": Setting((str,), "submitit backend: slurm; local or debug run the jobs on this machine (testing)",
                       choices=("slurm", "local", "debug")),
}
# the sweep's generic executor settings -> SLURM's own (peftbench.executors._base)
GENERIC = {"gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
           "timeout_min": "timeout_min", "max_retries": "max_retries", "workers": "array_parallelism"}


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


def validate(s: SlurmSettings) -> SlurmSettings:
    """Checks that depend on several settings (each setting's own bounds are checked when it is read)."""
    for key, value in (("additional_parameters", s.additional_parameters), ("setup", s.setup)):
        if key == "setup" and not all(isinstance(x, str) for x in value):
            raise SettingsError(f"SLURM setting setup: a list of strings, got {value!r}")
        if key == "additional_parameters":
            for k, v in value.items():
                if not isinstance(v, (str, int, float, bool)):
                    raise SettingsError(f"SLURM setting additional_parameters.{k}: a string, number or boolean, "
                                        f"got {v!r}")
    if s.signal_delay_s >= s.timeout_min * 60:
        raise SettingsError(f"SLURM settings: signal_delay_s={s.signal_delay_s} must be well below timeout_min*60 "
                            f"({s.timeout_min * 60}); SLURM may signal up to 60 s earlier still")
    if s.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", s.device):
        raise SettingsError(f"SLURM setting device={s.device!r}: expected auto, cpu, cuda or cuda:N")
    return s


def from_config(settings: dict) -> SlurmSettings:
    """The :class:`SlurmSettings` of the plugin's resolved settings (plain data)."""
    values = {k: v for k, v in settings.items() if k in SETTINGS}
    if "mem_gb" in values:
        values["mem_gb"] = float(values["mem_gb"])
    return validate(SlurmSettings(**values))


def make_settings(profile: str | Path | None = None, sets: list[str] = (), flags: dict | None = None) -> SlurmSettings:
    """SLURM settings as ``peftbench run`` makes them: a profile file < ``KEY=VALUE`` strings (``--executor-set``)
    < ``flags`` (values by key; None: not given). For Python use and tests."""
    from ..._io import toml_value
    from .._base import EXECUTORS

    table: dict[str, Any] = {"profile": str(profile)} if profile else {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SettingsError(f"--executor-set {item!r}: expected KEY=VALUE")
        table[key.strip()] = toml_value(raw.strip())
    table.update({k: v for k, v in (flags or {}).items() if v is not None})
    return from_config(EXECUTORS.get("slurm").configure(table, {}, lambda k: f"SLURM setting {k!r}"))
