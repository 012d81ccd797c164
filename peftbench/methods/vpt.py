"""Visual Prompt Tuning (docs/methods/vpt.md): learnable prompt tokens after CLS, backbone frozen.

* ``vpt-deep`` (alias ``vpt``): prompts before every block, replacing the previous block's prompt
  outputs; 12·768·p parameters for ViT-B/16. Prompt dropout 0.1.
* ``vpt-shallow``: prompts at the input only; 768·p parameters. Prompt dropout 0.0.

``prompt_tokens=auto`` takes the per-task prompt length of the VPT paper inferred from its per-task
Tuned/Total (docs/methods/vpt.md, data file ``tasks/data/vpt_prompt_lengths.csv``) and 10 for other tasks; the
run record says which.
"""
from peftbench.layers.prompted_vit import PromptedViT
from peftbench.methods import PROMPT_RECIPE, Method, Option, register_method
from peftbench.tasks import per_task_value

FALLBACK_TOKENS = 10


class _Vpt(Method):
    deep: bool = True
    recipe = PROMPT_RECIPE  # SGD, batch 64, 100 epochs, warm-up 10, lr x wd grid
    fusable = True

    def resolve_options(self, opts, task):
        opts = dict(opts)
        sources = {}
        if opts["prompt_tokens"] == "auto":
            column = "vpt_deep" if self.deep else "vpt_shallow"
            value, source = per_task_value("vpt_prompt_lengths.csv", column, task, FALLBACK_TOKENS)
            opts["prompt_tokens"] = int(value)
            sources["prompt_tokens"] = source
        return opts, sources

    def build(self, backbone, num_classes, opts):
        tokens = opts["prompt_tokens"]
        tokens = FALLBACK_TOKENS if tokens == "auto" else int(tokens)
        return PromptedViT(backbone, num_classes, tokens, deep=self.deep, dropout=float(opts["dropout"]))


def _vpt_options(dropout: float) -> dict[str, Option]:
    return {
        "prompt_tokens": Option("auto", "prompt length p (auto: VPT paper's per-task value, else 10)",
                                type=int, keywords=("auto",), min=0),
        "dropout": Option(dropout, "dropout on the prompt tokens", min=0.0, max=1.0),
    }


@register_method
class VptDeep(_Vpt):
    name = "vpt-deep"
    aliases = ("vpt",)
    description = "VPT-deep: prompt tokens before every block (docs/methods/vpt.md)"
    deep = True
    options = _vpt_options(dropout=0.1)


@register_method
class VptShallow(_Vpt):
    name = "vpt-shallow"
    description = "VPT-shallow: prompt tokens at the input only (docs/methods/vpt.md)"
    deep = False
    options = _vpt_options(dropout=0.0)
