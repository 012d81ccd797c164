"""What a SLURM job runs, as plain JSON: no pickle is written for a job, and none is ever read.

submitit's usual way (a pickled callable in ``<folder>/<job>_submitted.pkl``, unpickled by the job when
it starts and after every requeue; a pickled result read back by the driver) would execute whatever a
person who can write that folder plants there. peftbench uses submitit to write and submit the sbatch
script, to submit job arrays and to find the logs, but the job's command is

    <python> -u -m peftbench.executors.slurm.job <payload.json> [--task N]

and the payload holds only data: the run store's path, the device and tracking settings, and for each
array task the run specs it trains (:func:`write_payload`). The job rebuilds everything from that data
(:func:`read_payload` checks every field, and that every spec names a registered method and task);
its result is the run record it writes into the store, which the driver reads (never a pickle).

Defence in depth for the folder itself: the driver keeps its submitit folder and the payloads private
(created ``0o755`` and ``0o700``, refused when another user owns them or when group or others may write
them, :func:`check_private`), and the job refuses a payload that another user owns or could have
written. docs/slurm.md §7 and docs/reliability.md §2 say what is and is not trusted.
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from ..._io import atomic_write_text
from ...errors import SettingsError
from ...store import RunSpec

FORMAT = "peftbench-slurm-job"
VERSION = 1
PAYLOAD_DIR = "payloads"
# what a job needs besides its specs: name -> the JSON types it may have
FIELDS: dict[str, tuple[type, ...]] = {
    "runs_dir": (str,), "device": (str,), "quiet": (bool,), "tracking": (dict, type(None)), "save_weights": (str,),
    "fuse": (int,), "timeout_min": (int, float), "signal_delay_s": (int, float), "max_num_timeout": (int,),
}


class PayloadError(SettingsError):
    """A job payload (or the folder it lives in) that cannot be trusted or read."""


def _who(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_private(path: Path, what: str, *, upto: Path | None = None) -> None:
    """Refuse ``path`` (and every folder above it up to and including ``upto``) when another user owns
    it or when group or others may write it: whoever can write there could replace what a job reads."""
    me = os.geteuid()
    chain = [path]
    if upto is not None:
        upto, p = Path(os.path.abspath(upto)), Path(os.path.abspath(path))
        if upto in p.parents:  # a folder inside ``upto``: the folders between them too
            while p != upto:
                p = p.parent
                chain.append(p)
    for p in chain:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != me:
            raise PayloadError(f"{what} {p}: owned by {_who(st.st_uid)}, not by you ({_who(me)}); refusing it "
                               "(its owner could replace what your jobs read)")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PayloadError(f"{what} {p}: group or others may write it (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"refusing it (they could replace what your jobs read); `chmod go-w {p}` fixes it")


def make_dir(path: Path, mode: int) -> Path:
    """Create ``path`` and its missing parents with ``mode``, whatever the umask (existing ones are left)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, mode)
    return path


def private_dir(path: Path, mode: int, what: str, *, upto: Path | None = None) -> Path:
    """:func:`make_dir`, then :func:`check_private`."""
    make_dir(path, mode)
    check_private(path, what, upto=upto)
    return path


def write_payload(folder: Path, settings: dict[str, Any], tasks: list[list[RunSpec]]) -> Path:
    """The payload of one submission (one job, or one job array: task i trains ``tasks[i]``), written
    ``0o600`` into ``<folder>/payloads/`` (``0o700``)."""
    for name, types in FIELDS.items():
        if not isinstance(settings.get(name), types):
            raise TypeError(f"payload field {name!r}: {settings.get(name)!r}")
    pdir = private_dir(folder / PAYLOAD_DIR, 0o700, "the job payload folder", upto=folder)
    data = {"format": FORMAT, "version": VERSION, **{k: settings[k] for k in FIELDS},
            "tasks": [[s.to_dict() for s in pack] for pack in tasks]}
    path = pdir / f"{uuid.uuid4().hex}.json"
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.chmod(path, 0o600)
    return path


def read_payload(path: str | Path, task: int) -> tuple[dict, list[RunSpec]]:
    """The settings of a job and the specs of its array task ``task``; every field is checked (a
    :class:`PayloadError` naming the file otherwise)."""
    from ...methods import get_method
    from ...tasks import get_task

    path = Path(path)
    check_private(path, "the job payload")
    check_private(path.parent, "the job payload folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"{path}: not a readable job payload ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PayloadError(f"{path}: not a peftbench job payload (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise PayloadError(f"{path}: payload version {data.get('version')!r}; this peftbench reads version {VERSION}")
    for name, types in FIELDS.items():
        if isinstance(data.get(name), bool) and bool not in types or not isinstance(data.get(name), types):
            raise PayloadError(f"{path}: field {name!r} is {data.get(name)!r}")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, list) for t in tasks):
        raise PayloadError(f"{path}: 'tasks' is not a list of lists of run specs")
    if not 0 <= task < len(tasks):
        raise PayloadError(f"{path}: array task {task} does not exist (the payload has {len(tasks)})")
    specs = []
    for i, d in enumerate(tasks[task]):
        where = f"{path}: task {task} run {i}"
        try:
            spec = RunSpec.from_dict(d)
            get_method(spec.method), get_task(spec.task)  # registered names only: no path tricks
            if not isinstance(spec.hparams, dict) or not isinstance(spec.seed, int):
                raise TypeError("hparams/seed")
        except Exception as exc:
            raise PayloadError(f"{where}: not a run spec ({type(exc).__name__}: {exc})") from None
        specs.append(spec)
    return {k: data[k] for k in FIELDS}, specs
