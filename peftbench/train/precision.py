"""The numeric precision of a forward pass (fp32, tf32, bf16 or fp16 autocast): one context manager the loop,
the fused model and the bench share."""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32"):
    """The numeric precision of a forward pass: fp32; tf32 (fp32 tensors, TF32 matmuls on CUDA); bf16 or
    fp16 autocast (on CPU too, where torch supports it)."""
    device = torch.device(device)
    if precision in _AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision]):
            yield
    elif precision == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            with torch.autocast(device.type, enabled=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        with torch.autocast(device.type, enabled=False):
            yield
