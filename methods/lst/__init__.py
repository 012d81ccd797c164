"""LST (Sung, Cho, Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning", NeurIPS
2022): ``lst``. ``model.py`` (the ladder on a ViT, the Fisher importance, the structural pruning that initialises the
side network), ``method.py`` (options, the Fisher job, the stages). docs/methods/lst.md has the maths."""
from . import method  # noqa: F401  (registers lst)
