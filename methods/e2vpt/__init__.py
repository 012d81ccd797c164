"""E^2VPT (Han et al., ICCV 2023): ``e2vpt`` and ``e2vpt-prune``, one family in one folder (as peft's
per-tuner folders): ``kv_attention.py`` (key-value prompts in timm's Attention), ``model.py`` (the
prompted model, its masks, the ``e2vpt`` method), ``pruning.py`` (mask maths, importance scores,
candidates: pure functions), ``pipeline.py`` (``e2vpt-prune``'s stages). docs/methods/e2vpt.md has the maths."""
from . import model, pipeline  # noqa: F401  (registers e2vpt and e2vpt-prune)
