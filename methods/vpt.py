"""Visual Prompt Tuning (docs/methods/vpt.md): learnable prompt tokens after CLS, backbone frozen.

* ``vpt-deep`` (alias ``vpt``): prompts before every block, replacing the previous block's prompt
  outputs; 12·768·p parameters for ViT-B/16. Prompt dropout 0.1.
* ``vpt-shallow``: prompts at the input only; 768·p parameters. Prompt dropout 0.0.

On a Swin backbone: P prompts of the stage's width in every stage, prepended to every window
(:class:`peftbench.layers.prompted_swin.PromptedSwin`); 12,032·p parameters deep, 128·p shallow for Swin-B.

``prompt_tokens=auto`` takes the per-task prompt length of the VPT paper inferred from its per-task
Tuned/Total (docs/methods/vpt.md, data file ``methods/vpt_prompt_lengths.csv`` beside this one) and 10 for
other tasks; the
run record says which.
"""
from pathlib import Path

from peftbench.layers.prompted_swin import PromptedSwin, is_swin
from peftbench.layers.prompted_vit import PromptedViT
from peftbench.methods import PROMPT_RECIPE, Method, Option, PerTask, register_method

FALLBACK_TOKENS = 10
PROMPT_LENGTHS = Path(__file__).with_name("vpt_prompt_lengths.csv")


class _Vpt(Method):
    deep: bool = True
    recipe = PROMPT_RECIPE  # SGD, batch 64, 100 epochs, warm-up 10, lr x wd grid
    fusable = True
    # Swin: P prompts per stage in every window, VPT's PromptedSwinTransformer (docs/methods/vpt.md §11)
    families = ("vit", "swin")

    def build(self, backbone, num_classes, opts):
        if is_swin(backbone):
            return PromptedSwin(backbone, num_classes, int(opts["prompt_tokens"]), deep=self.deep,
                                dropout=float(opts["dropout"]))
        return PromptedViT(backbone, num_classes, int(opts["prompt_tokens"]), deep=self.deep,
                           dropout=float(opts["dropout"]))


def _vpt_options(dropout: float, column: str) -> dict[str, Option]:
    return {
        "prompt_tokens": Option("auto", "prompt length p (auto: VPT paper's per-task value, else 10)", type=int, min=0,
                                per_task=PerTask(PROMPT_LENGTHS, FALLBACK_TOKENS, column=column)),
        "dropout": Option(dropout, "dropout on the prompt tokens", min=0.0, max=1.0),
    }


@register_method
class VptDeep(_Vpt):
    name = "vpt-deep"
    aliases = ("vpt",)
    description = "VPT-deep: prompt tokens before every block (docs/methods/vpt.md)"
    deep = True
    options = _vpt_options(dropout=0.1, column="vpt_deep")


@register_method
class VptShallow(_Vpt):
    name = "vpt-shallow"
    description = "VPT-shallow: prompt tokens at the input only (docs/methods/vpt.md)"
    deep = False
    options = _vpt_options(dropout=0.0, column="vpt_shallow")
