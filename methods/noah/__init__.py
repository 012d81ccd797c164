"""NOAH (Zhang, Zhou, Liu, "Neural Prompt Search", arXiv 2206.04673): ``noah``. ``model.py`` (per-block prompts, LoRA
and adapters of any sizes, the supernet), ``search.py`` (the evolutionary search), ``method.py`` (options, the released
subnets, the stages). docs/methods/noah.md has the maths."""
from . import method  # noqa: F401  (registers noah)
