"""Display names for the papers' tables (``--format latex|markdown``): methods as the papers print them (LoRA, VPT-deep,
E^2VPT...), tasks as the VPT/E^2VPT tables head their columns (CIFAR-100, Clevr/count...). ``--raw-names`` keeps
peftbench's identifiers. A configuration keeps its options after the name (``Adapter (reduction=64)``); a name without
an entry is printed as it is."""
from __future__ import annotations

import re

METHODS = {
    "linear": "Linear", "full": "Full", "mlp-3": "MLP-3", "partial-1": "Partial-1", "bitfit": "BitFit",
    "ln-tune": "LN-tune", "difffit": "DiffFit", "ssf": "SSF",
    "vpt-shallow": "VPT-shallow", "vpt-deep": "VPT-deep", "vfpt": "VFPT", "e2vpt": "E^2VPT (no pruning)",
    "e2vpt-prune": "E^2VPT", "vqt": "VQT",
    "adapter": "Adapter", "adapter-noah": "Adapter (NOAH)", "adapter-houlsby": "Houlsby", "adapter-plus": "Adapter+",
    "adaptformer": "AdaptFormer", "convpass": "Convpass", "repadapter": "RepAdapter", "fact-tt": "FacT-TT",
    "fact-tk": "FacT-TK", "hydra": "Hydra", "dtl": "DTL", "dtl-plus": "DTL+", "sct": "SCT", "snell": "SNELL",
    "gps": "GPS", "spt-lora": "SPT-LoRA", "spt-adapter": "SPT-Adapter", "noah": "NOAH", "cvpt": "CVPT", "vapt": "VAPT",
    "hst": "HST",
    "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "ia3": "(IA)^3", "fourierft": "FourierFT", "loha": "LoHa",
    "lokr": "LoKr", "boft": "BOFT", "oft": "OFT", "hra": "HRA", "randlora": "RandLoRA", "shira": "SHiRA",
    "vblora": "VB-LoRA", "gralora": "GraLoRA", "hira": "HiRA", "delora": "DeLoRA", "road": "RoAd", "miss": "MiSS",
    "c3a": "C^3A",
}

TASKS = {
    # VTAB-1k, as the VPT and E^2VPT tables head them
    "cifar100": "CIFAR-100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Patch Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy", "clevr_count": "Clevr/count",
    "clevr_distance": "Clevr/distance", "dmlab": "DMLab", "kitti_distance": "KITTI/distance",
    "dsprites_location": "dSprites/location", "dsprites_orientation": "dSprites/orientation",
    "smallnorb_azimuth": "SmallNORB/azimuth", "smallnorb_elevation": "SmallNORB/elevation",
    # FGVC
    "cub200": "CUB-200-2011", "nabirds": "NABirds", "oxford_flowers": "Oxford Flowers", "stanford_dogs": "Stanford Dogs",
    "stanford_cars": "Stanford Cars",
}

_CONFIG = re.compile(r"^(?P<method>[A-Za-z0-9_.+-]+)(?P<rest>.*)$")


def method_title(label: str, raw: bool = False) -> str:
    """``lora`` → ``LoRA``; ``adapter(reduction=64)`` → ``Adapter (reduction=64)``; ``linear@demo-vit-random`` →
    ``Linear @demo-vit-random``; unknown names unchanged."""
    if raw:
        return label
    m = _CONFIG.match(label)
    if not m or m.group("method") not in METHODS:
        return label
    rest = m.group("rest")
    return METHODS[m.group("method")] + (f" {rest}" if rest else "")


def task_title(task: str, raw: bool = False) -> str:
    return task if raw else TASKS.get(task, task)
