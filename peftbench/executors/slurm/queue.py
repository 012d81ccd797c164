"""SLURM job states: ``sacct`` first, ``squeue`` for what accounting does not know."""
from __future__ import annotations

import re
import shutil
import subprocess

# SLURM job states (sacct/squeue). ACTIVE: the job may still produce a record, keep waiting.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
                 "POWER_UP_NODE", "UPDATE_DB"}
HELD_STATES = {"REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD", "STOPPED", "SUSPENDED"}
# Anything else the scheduler reports is terminal: COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
# OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE, REVOKED, plus our own VANISHED (SlurmExecutor._wait).
UNKNOWN = "UNKNOWN"
VANISHED = "VANISHED"


def _expand_job_ids(jid: str) -> list[str]:
    """``123``, ``123_4`` or ``123_[0-3,7%2]`` → the ids they stand for."""
    m = re.fullmatch(r"(\d+)_\[([^\]%]+)(%\d+)?\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += [f"{m.group(1)}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{m.group(1)}_{int(part)}")
    return out


def parse_state_lines(text: str) -> dict[str, dict]:
    """``JobID|State|NodeList`` lines (sacct -P / squeue -o) → {job id: {"state", "node"}}."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0] or parts[0] == "JobID":
            continue
        state = parts[1].split()[0].rstrip("+") if parts[1].strip() else UNKNOWN
        node = parts[2] if len(parts) > 2 and parts[2] not in ("", "None assigned", "(null)") else None
        for jid in _expand_job_ids(parts[0]):
            out[jid] = {"state": state, "node": node}
    return out


def slurm_available() -> bool:
    return shutil.which("squeue") is not None or shutil.which("sacct") is not None


def query_states(job_ids: list[str], timeout: float = 60, not_in_queue: set | None = None) -> dict[str, dict]:
    """Current state of SLURM jobs (``123`` or ``123_4``): sacct, then squeue for what sacct does not
    know (accounting off, or a record not yet in the database). Unknown ids are left out; those that
    squeue positively does not know (it answered, without them) are added to ``not_in_queue``."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    base = sorted({j.split("_")[0] for j in ids})
    found: dict[str, dict] = {}
    if shutil.which("sacct"):
        try:
            r = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList", "-j", ",".join(base)],
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0:
                found.update(parse_state_lines(r.stdout))
        except (OSError, subprocess.TimeoutExpired):
            pass
    missing = [j for j in ids if j not in found]
    if missing and shutil.which("squeue"):
        try:
            r = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%N",
                                "-j", ",".join(sorted({j.split("_")[0] for j in missing}))],
                               capture_output=True, text=True, timeout=timeout)
            answered = r.returncode == 0 or "Invalid job id" in r.stderr
            for jid, v in parse_state_lines(r.stdout if r.returncode == 0 else "").items():
                found.setdefault(jid, v)
            if answered and not_in_queue is not None:
                not_in_queue.update(j for j in missing if j not in found)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {j: found[j] for j in ids if j in found}


def is_active(state: str | None) -> bool:
    return state in ACTIVE_STATES


# Pending reasons (squeue %r) that waiting does not cure: the request can never be met as it is.
HOPELESS_REASONS = {
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount", "InvalidQOS",
    "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob", "QOSMaxWallDurationPerJobLimit",
    "QOSMaxNodePerJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxGRESPerJob", "AssocMaxMemPerJob",
    "AssocMaxWallDurationPerJobLimit", "AssocMaxNodesPerJobLimit", "ReqNodeNotAvail, UnavailableNodes",
    "PartitionDown", "PartitionInactive", "AccountNotAllowed", "QOSNotAllowed",
}


def parse_reason_lines(text: str) -> dict[str, str]:
    """``JobID|Reason`` lines (squeue -o '%i|%r') → {job id: reason} (array ranges expanded)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 1)
        if len(parts) == 2 and parts[0]:
            for jid in _expand_job_ids(parts[0]):
                out[jid] = parts[1].strip()
    return out


def pending_reasons(job_ids: list[str], timeout: float = 60) -> dict[str, str]:
    """Why pending jobs wait (squeue's reason), for the jobs squeue knows."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r",
                            "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = parse_reason_lines(r.stdout if r.returncode == 0 else "")
    return {j: found[j] for j in job_ids if j in found}


def hopeless(reason: str | None) -> bool:
    return bool(reason) and (reason in HOPELESS_REASONS or reason.split(",")[0].strip() in HOPELESS_REASONS)
