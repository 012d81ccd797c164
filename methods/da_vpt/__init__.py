"""DA-VPT (Ren et al., "DA-VPT: Semantic-Guided Visual Prompt Tuning for Vision Transformers", CVPR 2025): ``da-vpt``.
``model.py`` (the prompts, the partial bias tuning, the proxy-anchor loss, the cosine k-means), ``method.py``
(options, the mapping job, the stages), ``settings.csv`` (the per-task values of the official configs).
docs/methods/da-vpt.md has the maths."""
from . import method  # noqa: F401  (registers da-vpt)
