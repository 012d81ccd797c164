"""``glora-search``: GLoRA with its official per-layer search (Chavan et al., "One-for-All: Generalized LoRA for
Parameter-Efficient Fine-tuning", arXiv 2306.07967; Arnav0400/ViT-Slim@0fed674 GLoRA/; docs/methods/glora_search.md).

``paths=search`` (the default) runs the official two steps as stages (:meth:`GLoRASearch.pipeline`):

1. ``supernet``: one training run on the search splits (train800 → val200) of the supernet, which draws a random
   configuration for every layer at every forward (supernet.py; 500 epochs officially: ``supernet_epochs`` auto = 5 x
   the protocol's 100), its trained tensors kept;
2. ``evolution`` (job): the evolutionary search (``search.py``) scores configurations of the trained supernet on val200
   within the parameter limit → the chosen configuration (``<key>.paths.json`` and the record's ``paths``);
3. the protocol's ``search`` (its grid, when it has more than one point) and ``final`` runs train the chosen
   configuration from the pretrained backbone, every seed on train800val200 → test.

Explicit ``paths`` (five letters per layer: ``--set glora-search.paths=LLvcn,...``) train that configuration, no search.
The official code does not retrain: it reports the supernet's weights under the configuration chosen on the test set.
"""
from __future__ import annotations

import dataclasses
import json

from peftbench._io import atomic_write_text
from peftbench.errors import PipelineError
from peftbench.methods import Method, Option, noah_fixed_recipe, register_method
from peftbench.sweep.stages import job_stage, search_then_final

from .model import CHOICES, LINEARS, GLoRAViT, decode, encode
from .search import GLoRAEvolution

CODE = "Arnav0400/ViT-Slim@0fed674c"
SEARCH = "search"
# No official retraining recipe (the supernet is the result); the unified protocols train the chosen configuration as
# the NOAH-lineage modules. demo lr: LoRA's (not searched for this method; results/README.md says so)
GLORA_RECIPE = noah_fixed_recipe(demo_lr=0.04)


def layers_of(backbone) -> int:
    return len(backbone.blocks) * len(LINEARS)


@register_method
class GLoRASearch(Method):
    name = "glora-search"
    description = ("GLoRA (official layer): W + W*A + B, b + b*D + E + W C per Linear, one path per term and layer "
                   "chosen by its supernet and evolutionary search (docs/methods/glora_search.md)")
    version = 1
    recipe = GLORA_RECIPE
    options = {
        "paths": Option(SEARCH, "one configuration per block Linear, 5 letters each (A B C D E; L lora, v vector, c "
                                "constant, n none), comma-separated; 'search': the supernet and evolutionary search",
                        type=str, keywords=(SEARCH,)),
        "rank": Option(4, "r of every LoRA path (supernet.py / evolution.py --rank default 4)", min=1),
        "param_limit": Option(1.0, "the search's limit on the count, in millions (evolution.py --param-limits default "
                                   "1.00; the README passes a per-task value it does not publish)", min=0.0),
        "min_param_limit": Option(0.0, "the search's lower limit, in millions (--min-param-limits)", min=0.0),
        "population": Option(50, "candidates per generation (--population-num)", min=1),
        "select": Option(10, "parents: the best kept (--select-num)", min=1),
        "mutation": Option(25, "mutants per generation (--mutation-num)", min=0),
        "crossover": Option(25, "crosses per generation (--crossover-num)", min=0),
        "m_prob": Option(0.2, "probability that a mutant redraws a term of a layer (--m_prob)", min=0.0, max=1.0),
        "iterations": Option(20, "generations (--max-epochs)", min=1),
        "supernet_epochs": Option("auto", "the supernet's epochs (auto: 5 x the protocol's; GLoRA: 500)", type=int,
                                  min=1, keywords=("auto",)),
        "supernet_lr_ratio": Option(1.0, "the supernet's lr / the protocol's lr", min=0.0),
        "supernet": Option(False, "build the supernet (set by the pipeline's supernet and evolution stages)"),
    }

    def build(self, backbone, num_classes, opts):
        import torch

        searched = str(opts["paths"]) == SEARCH
        configs = None if searched or opts.get("supernet") else decode(str(opts["paths"]), layers_of(backbone))
        return GLoRAViT(backbone, num_classes, int(opts["rank"]), configs, seed=torch.initial_seed())

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        opts = dict(ctx.options)
        if str(opts["paths"]) != SEARCH:
            return (yield from protocol.pipeline(ctx))
        sources = dict(ctx.option_sources)
        seed0 = ctx.seeds[0]
        points = protocol.search_points(ctx)
        base_search, base_final = protocol.base_hparams(ctx, "search"), protocol.base_hparams(ctx, "final")
        if "lr" not in points[0] and "lr" not in base_search:
            raise PipelineError(f"glora-search on {ctx.task.name}: the protocol gives the supernet no learning rate "
                                "(neither a search point nor its settings have one): pass --lr")
        lr = float(points[0].get("lr", base_search.get("lr")))
        epochs = int(base_search["epochs"])
        super_hp = {**base_search, **points[0], "lr": lr * float(opts["supernet_lr_ratio"]),
                    "epochs": 5 * epochs if opts["supernet_epochs"] == "auto" else int(opts["supernet_epochs"]),
                    "eval_every": 0}
        super_opts = {**opts, "supernet": True}
        supernet = dataclasses.replace(ctx.spec("supernet", "search", super_hp, seed0, options=super_opts,
                                                extras={"save_final": True}), option_sources=dict(sources))
        yield from job_stage(ctx, [supernet], "supernet")
        seen = {k: base_final[k] for k in ("interpolation", "mean", "std") if k in base_final}
        evolution = dataclasses.replace(
            ctx.spec("evolution", "search", {"batch_size": int(base_search["batch_size"]), **seen}, seed0,
                     job="evolution", options=super_opts,
                     extras={"init_state": f"{supernet.key}.final.safetensors"}), option_sources=dict(sources))
        found = yield from job_stage(ctx, [evolution], "evolution")
        if found is None:  # a dry run: plan with every path at LoRA
            paths = SEARCH
        else:
            paths = found[0].get("paths")
            if not isinstance(paths, str) or not paths:
                raise PipelineError(f"glora-search on {ctx.task.name}: the evolution run {evolution.key} recorded no "
                                    f"configuration (it has {paths!r}); delete its record to search again")
        chosen = {**opts, "paths": paths}
        sources["paths"] = f"GLoRA search: evolution run {evolution.key}"

        def spec(stage, role, hp, seed):
            return dataclasses.replace(ctx.spec(stage, role, hp, seed, options=chosen), option_sources=dict(sources))

        return (yield from search_then_final(ctx, points, base_search, base_final, spec))

    # -- the evolution job --------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "evolution":
            return super().run_job(job, spec, store, env)
        import torch

        from peftbench.train.build import build_model, parameter_summary
        from peftbench.train.loop import evaluate, run_data

        model = build_model(spec, env, store)  # the supernet with its trained tensors (init_state)
        params = parameter_summary(model)
        model.to(torch.device(env.device)).eval()
        data = run_data(spec, model, env)
        opts = spec.options
        evo = GLoRAEvolution(choices=CHOICES, depth=len(model.glora_layers), limit=float(opts["param_limit"]),
                             min_limit=float(opts["min_param_limit"]), population=int(opts["population"]),
                             select=int(opts["select"]), mutation=int(opts["mutation"]),
                             crossover=int(opts["crossover"]), m_prob=float(opts["m_prob"]),
                             iterations=int(opts["iterations"]), seed=int(spec.seed))

        def score(cand) -> float:
            model.set_configs(cand)
            with torch.no_grad():
                return evaluate(model, model, data.eval_x, data.eval.labels, data.prepare, env)

        try:
            best = evo.run(score, model.count)
        except ValueError:
            raise PipelineError(f"glora-search on {spec.task}: no configuration within [{evo.min_limit}, {evo.limit}]M "
                                "parameters (options param_limit, min_param_limit)") from None
        paths = encode(best)
        summary = {"task": spec.task, "run": spec.key, "paths": paths, "val_top1": evo.scored[best]["acc"],
                   "count_M": evo.scored[best]["params"], "scored": len(evo.scored), "history": evo.history,
                   "limit_M": [evo.min_limit, evo.limit], "code": CODE}
        atomic_write_text(store.artifact_path(spec, "paths.json"), json.dumps(summary, indent=1) + "\n")
        env.log(f"glora-search: {spec.task}: configuration chosen among {len(evo.scored)} scored, val top-1 "
                f"{evo.scored[best]['acc']:.2f}, {evo.scored[best]['params']:.3f}M")
        return {"status": "ok", "params": params, "paths": paths,
                "evolution": {k: v for k, v in summary.items() if k not in ("paths", "history")},
                "artifacts": {"paths": f"{spec.key}.paths.json"}}
