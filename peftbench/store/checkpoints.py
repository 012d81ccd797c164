"""Resume state of an unfinished run, stored without pickle.

One file, ``<key>.ckpt.safetensors``: the tensors (trainable state, optimizer state, RNG states) as
safetensors, everything else (epoch, history, timings, the optimizer's hyper-parameters and scalar
state) as JSON in the file's metadata. Reading it runs no code: safetensors parses a JSON header and
raw tensor bytes, nothing else. Anything else found where a checkpoint should be (a file that is not
safetensors, a safetensors file without peftbench's metadata, or a pickled ``<key>.ckpt.pt`` of
peftbench 0.1) is refused with a :class:`~peftbench.errors.StoreError` that names the file: it is
never opened by ``torch.load``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import atomic_write
from ..errors import StoreError

FORMAT = "peftbench-checkpoint"
VERSION = 1
META_KEY = "peftbench"


def _encode(obj: Any) -> Any:
    """JSON form of optimizer hyper-parameters / scalar state (tuples kept as tuples)."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's metadata")


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(x) for x in obj["__tuple__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(x) for x in obj]
    return obj


def write_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None, what: str = "the tensors") -> Path:
    """Write ``tensors`` (name -> tensor) as safetensors at ``path``, atomically. Whatever fails — the disk (an
    ``OSError``, or safetensors' own ``SafetensorError`` for an I/O error inside it), a folder that cannot be
    written, a tensor it cannot store — is a one-line :class:`~peftbench.errors.StoreError` naming ``what`` and
    the file; the old file, if any, is kept."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except OSError as exc:
        raise StoreError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:  # safetensors' own errors and checks
        raise StoreError(f"cannot write {what} {path}: {exc}") from None


def save(path: Path, *, state: dict, optimizer: dict, rng: dict, info: dict, extra: dict | None = None) -> None:
    """Write a checkpoint atomically. ``state``: name -> tensor; ``optimizer``: a torch optimizer
    ``state_dict()``; ``rng``: name -> tensor (generator states); ``info``: JSON-able scalars; ``extra``: name ->
    tensor, what else the loop keeps (a model EMA's averages)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        tensors[f"state/{name}"] = t.detach().cpu().contiguous()
    opt_state: dict[str, dict] = {}
    for idx, entry in optimizer["state"].items():
        scal = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scal[k] = v
        opt_state[str(idx)] = scal
    for name, t in rng.items():
        tensors[f"rng/{name}"] = t.detach().cpu().contiguous()
    for name, t in (extra or {}).items():
        tensors[f"extra/{name}"] = t.detach().cpu().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "info": _encode(info),
            "optimizer": {"param_groups": _encode(optimizer["param_groups"]), "scalars": _encode(opt_state),
                          "indices": sorted(str(i) for i in optimizer["state"])}}
    write_tensors(path, tensors, {META_KEY: json.dumps(meta)}, "the checkpoint")


def load(path: Path) -> dict:
    """``{"state", "optimizer", "rng", "info"}`` of a checkpoint written by :func:`save`."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta_raw = (fh.metadata() or {}).get(META_KEY)
            if meta_raw is None:
                raise StoreError(f"refusing to resume from {path}: a safetensors file without peftbench's "
                                 "checkpoint metadata; delete it to restart the run from its first epoch")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StoreError(f"refusing to resume from {path}: not a peftbench checkpoint ({exc}); delete it to "
                         "restart the run from its first epoch") from None
    try:
        meta = json.loads(meta_raw)
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
    except (ValueError, TypeError) as exc:
        raise StoreError(f"refusing to resume from {path}: unknown checkpoint metadata ({exc})") from None
    opt = meta["optimizer"]
    scalars = _decode(opt["scalars"])
    state: dict[int, dict] = {}
    for idx in opt["indices"]:
        entry = dict(scalars.get(idx, {}))
        prefix = f"optim/{idx}/"
        entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state[int(idx)] = entry
    return {
        "state": {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")},
        "optimizer": {"state": state, "param_groups": _decode(opt["param_groups"])},
        "rng": {k[len("rng/"):]: v for k, v in tensors.items() if k.startswith("rng/")},
        "extra": {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")},
        "info": _decode(meta["info"]),
    }


def epoch(path: Path) -> int:
    """The epoch a run resumes from (0 without a readable checkpoint); reads only the metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(META_KEY) or "{}")
        return int(meta["info"]["epoch"]) + 1
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return 0
