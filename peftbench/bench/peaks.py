"""Peak dense throughput of accelerators, for model-FLOPs utilisation (MFU = achieved FLOP/s / peak).

Vendor datasheet numbers for dense maths (no structured sparsity), in TFLOP/s per precision. ``fp32``
is the plain FP32 pipeline (what torch uses for float32 matmuls unless TF32 is allowed), ``tf32`` the
tensor-core TF32 rate, ``bf16``/``fp16`` the tensor-core rates with FP32 accumulation. Devices are
matched by the longest pattern contained in ``torch.cuda.get_device_name()``; ``--peak-tflops``
overrides the table (CPUs have no entry: their MFU column stays empty).
"""
from __future__ import annotations

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA datasheets (dense)
    "B200": {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},  # SXM (HBM3)
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a device name and precision, or None when the device is not in the table."""
    matches = [p for p in PEAK_TFLOPS if p.lower() in device_name.lower()]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(precision)


def mfu_pct(gflops_per_image: float, images_per_s: float, peak: float | None) -> float | str:
    """Achieved model FLOP/s as a percentage of ``peak`` TFLOP/s ("" when there is no peak)."""
    if not peak:
        return ""
    return round(100.0 * gflops_per_image * images_per_s / (peak * 1e3), 2)
