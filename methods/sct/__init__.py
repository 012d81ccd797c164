"""SCT (Zhao et al., "SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient Channels", IJCV 2024):
``sct``. ``model.py`` (the channel module on the residual stream, the saliency score), ``method.py`` (options, the
saliency job, the stages). docs/methods/sct.md has the maths."""
from . import method  # noqa: F401  (registers sct)
