"""GPS (Zhang et al., CVPR 2024): ``gps``. ``model.py`` (the sparse-delta ViT, the selection rule),
``selection.py`` (the contrastive-gradient stage's maths), ``method.py`` (options, stages, the gradient job).
docs/methods/gps.md has the maths."""
from . import method  # noqa: F401  (registers gps)
