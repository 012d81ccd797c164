"""GLoRA with its official supernet and evolutionary search (Chavan et al., arXiv 2306.07967; Arnav0400/ViT-Slim
GLoRA/): ``glora-search``. ``model.py`` (the layer's five terms and their paths, the supernet), ``search.py`` (the
evolution, on NOAH's loop), ``method.py`` (options, the stages). docs/methods/glora_search.md has the maths. (``glora``
is peft's one-configuration GLoRA: methods/peft_tuners.py.)"""
from . import method  # noqa: F401  (registers glora-search)
