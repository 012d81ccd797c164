"""``peftbench data bench``: loader images/s, cold decode against the warm memory-mapped cache."""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import torch

from ..tasks import Task
from .cache import cache_header, decode_workers, decoded_dir, decoded_images, open_cache_file, write_cache_file
from .images import decode_many
from .layouts import Split, locate
from .splits import read_split
from .transforms import geometry, resampling


def bench(task: Task, data_root: Path, split: str, size: int, *, batch: int = 256, limit: int | None = None) -> dict:
    """Images per second: cold decode (no cache) vs warm memory map (random batches, as training reads)."""
    s = read_split(task, data_root, split)
    if limit is not None and limit < len(s):
        s = Split(s.task, s.name, s.file, s.paths[:limit], s.labels[:limit])
    geo = geometry(task, split, size, resampling(task, data_root))
    n = len(s)
    t0 = time.perf_counter()
    decode_many(s.paths, geo.stored, geo.interpolation, decode_workers(), geo.resize_shorter)
    cold = n / (time.perf_counter() - t0)
    out = {"task": task.name, "split": split, "images": n, "stored": geo.stored, "cold_decode_img_s": cold,
           "workers": decode_workers()}
    if decoded_dir() is None:
        out["warm_memmap_img_s"] = None
        return out
    if limit is None:
        t0 = time.perf_counter()
        images = decoded_images(task, data_root, s, geo, log=False)  # builds the cache when missing
        out["first_load_s"] = time.perf_counter() - t0
    else:  # a subset: its own throw-away file
        tmp_path = decoded_dir() / f".bench-{os.getpid()}-{uuid.uuid4().hex[:6]}.u8"
        header = cache_header(task, s, geo, "bench", locate(task, data_root)[1])
        write_cache_file(tmp_path, header, s, geo, log=False)
        images = torch.from_numpy(open_cache_file(tmp_path, header))
    t0 = time.perf_counter()
    opened = decoded_images(task, data_root, s, geo, log=False) if limit is None else images
    out["open_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    arr = opened.numpy()  # the memory map itself
    for key, gather in (("warm_memmap_img_s", lambda idx: arr[idx.numpy()]),  # page-cache copies
                        ("torch_index_img_s", lambda idx: opened[idx])):  # torch indexing, for comparison
        gather(torch.randperm(n, generator=g)[:batch])  # warm-up
        t0 = time.perf_counter()
        seen, epochs = 0, 0
        while epochs < 2 or time.perf_counter() - t0 < 0.3:  # random batches, as training reads them
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch):
                seen += gather(order[i:i + batch]).shape[0]
            epochs += 1
        out[key] = seen / (time.perf_counter() - t0)
    if limit is not None:
        del images, opened
        with contextlib.suppress(OSError):
            tmp_path.unlink()
    return out
