"""SPT (He et al., ICCV 2023): ``spt-lora`` and ``spt-adapter``. ``sensitivity.py`` (SPT's tensors on timm's
fused qkv, the budget sweep: pure functions), ``model.py`` (structured modules, vectors, sparse deltas),
``method.py`` (options, stages, the sensitivity job). docs/methods/spt.md has the maths."""
from . import method  # noqa: F401  (registers spt-lora and spt-adapter)
