"""The method API and the built-in methods.

The API (what a plugin imports from ``peftbench.methods``): :class:`Method`, :class:`Option`,
:class:`Recipe` and the shared recipes, :class:`TunedViT` / :func:`make_head` (the model a method
builds), :func:`register_method`, the :data:`METHODS` registry. The built-in methods are the public
modules of this package, one method (or one family, e.g. ``peft_tuners.py``, ``e2vpt/``) per module,
each registering itself; a third-party package adds methods the same way and declares a
``peftbench.methods`` entry point (docs/plugins.md). Each method's maths is in docs/methods/.
"""
from ..errors import OptionError
from ..layers.tuned_vit import HEAD_BIAS_INIT, TunedViT, make_head
from ._base import AUTO, METHODS, Method, Option, PerTask, get_method, per_task_row, register_method
from ._recipes import (
                       FULL_FT_LR_GRID,
                       FULL_FT_RECIPE,
                       LINEAR_RECIPE,
                       NOAH_FIXED_RECIPE,
                       NOAH_RECIPE,
                       PROMPT_RECIPE,
                       VPT_LR_GRID,
                       VPT_WD_GRID,
                       Recipe,
                       SuiteOverride,
                       noah_fixed_recipe,
)

__all__ = ["Method", "Option", "PerTask", "AUTO", "per_task_row", "OptionError",
           "Recipe", "SuiteOverride", "TunedViT", "make_head", "HEAD_BIAS_INIT",
           "METHODS", "register_method", "get_method", "PROMPT_RECIPE", "LINEAR_RECIPE", "FULL_FT_RECIPE",
           "NOAH_RECIPE", "NOAH_FIXED_RECIPE", "noah_fixed_recipe", "VPT_LR_GRID", "VPT_WD_GRID", "FULL_FT_LR_GRID"]
