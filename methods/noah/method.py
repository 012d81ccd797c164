"""``noah``: Neural prOmpt seArcH (Zhang, Zhou, Liu, "Neural Prompt Search", arXiv 2206.04673; official code
ZhangYuanhan-AI/NOAH@e9c55f3; docs/methods/noah.md). Per block, visual prompts, LoRA on qkv and an adapter after the
MLP, each of a size a search chose (``model.py``).

Where the sizes come from (the options ``prompt_dims``, ``lora_dims``, ``adapter_dims``):

* ``auto`` on a VTAB-1k task: the subnet NOAH released for it (``subnets.csv``, transcribed from
  ``experiments/NOAH/subnet/VTAB/ViT-B_prompt_<task>.yaml``): the final runs train it, no search;
* ``auto`` on any other task (``search``): NOAH's neural prompt search, as stages (:meth:`Noah.pipeline`):

  1. ``supernet``: one training run on the search splits (train800 → val200) of the supernet, which samples a random
     subnet of the search space before every step (``supernet_train_prompt.py --mode super``), for
     ``supernet_epochs`` at ``supernet_lr_ratio`` x the protocol's lr; its trained tensors are kept;
  2. ``evolution`` (job): the evolutionary search (``search.py``) scores subnets of the trained supernet on val200
     within NOAH's parameter limit → the chosen subnet (``<key>.subnet.json`` and the record's ``subnet``);
  3. the protocol's ``search`` (its lr × wd grid, when it has more than one point) and ``final`` runs retrain the
     chosen subnet from the pretrained backbone (``--mode retrain``), every seed on train800val200 → test;
* explicit sizes (``--set noah.prompt_dims=10,5,...``): that subnet, no search.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from peftbench._io import atomic_write_text
from peftbench.errors import PipelineError
from peftbench.methods import Method, Option, PerTask, noah_fixed_recipe, register_method
from peftbench.sweep.stages import job_stage, search_then_final

from .model import KINDS, NoahViT, Subnet, noah_count
from .search import Evolution

SUBNETS = Path(__file__).with_name("subnets.csv")
CODE = "ZhangYuanhan-AI/NOAH@e9c55f360be4f7f1133a08bf84f86f0309e98f8c"
SEARCH = "search"
# The retrain recipe of the NOAH lineage (AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up:
# configs/NOAH/VTAB/subnet/slurm_retrain_vtab.sh:11,23,36); demo lr: LoRA's and the adapters' (results/demo-hparam-search.csv)
NOAH_SEARCH_RECIPE = noah_fixed_recipe(demo_lr=0.04)
OPTION_OF = {"prompts": "prompt_dims", "lora": "lora_dims", "adapter": "adapter_dims"}


def _sizes(name: str, text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"noah: option {name!r}: {text!r} is not a list of sizes (e.g. 10,5,1,...) nor "
                         f"'{SEARCH}'") from None
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"noah: option {name!r}: sizes must be integers >= 0, got {text!r}")
    return sizes


def _choices(text: str, what: str) -> tuple[int, ...]:
    sizes = _sizes(what, text)
    if 0 in sizes:
        raise ValueError(f"noah: option {what!r}: choices must be >= 1, got {text!r}")
    return sizes


def searched(opts) -> bool:
    values = [str(opts[OPTION_OF[k]]) for k in KINDS]
    if any(v == SEARCH for v in values) and not all(v == SEARCH for v in values):
        raise ValueError("noah: prompt_dims, lora_dims and adapter_dims are searched together: give all three sizes "
                         "or none")
    return values[0] == SEARCH


def depth_choices(opts, depth: int) -> tuple[int, ...]:
    """``depth_choices``: ``auto`` = NOAH's 3, 6, 9, 12 blocks of 12 (supernet-B_prompt_VTAB.yaml), as quarters of the
    backbone's depth (the same on ViT-B)."""
    if opts["depth_choices"] == "auto":
        return tuple(sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)}))
    out = _choices(str(opts["depth_choices"]), "depth_choices")
    if max(out) > depth:
        raise ValueError(f"noah: depth_choices {out} exceed the backbone's {depth} blocks")
    return out


def space(opts, depth: int) -> dict:
    return {"dims": _choices(str(opts["dim_choices"]), "dim_choices"), "depths": depth_choices(opts, depth)}


def subnet_of(opts, depth: int) -> Subnet:
    """The subnet the options give; a searched one (or a supernet) is built at the space's largest sizes."""
    if searched(opts) or opts.get("supernet"):
        return Subnet.uniform(depth, max(space(opts, depth)["dims"]))
    return Subnet(*(_sizes(OPTION_OF[k], opts[OPTION_OF[k]]) for k in KINDS))


def _per_task(column: str) -> PerTask:
    return PerTask(SUBNETS, SEARCH, column=column, fallback_reason="no released subnet: NOAH's search")


@register_method
class Noah(Method):
    name = "noah"
    description = ("NOAH: per-block prompts, LoRA on qkv and adapters of searched sizes (released VTAB subnets, else "
                   "supernet + evolutionary search + retraining) (docs/methods/noah.md)")
    version = 1
    recipe = NOAH_SEARCH_RECIPE
    options = {
        "prompt_dims": Option("auto", "prompt tokens per block, comma-separated (auto: the released subnet of a VTAB "
                                      "task, else 'search')", type=str, per_task=_per_task("prompt_dims"),
                              keywords=(SEARCH,)),
        "lora_dims": Option("auto", "LoRA rank per block on qkv (auto: as prompt_dims)", type=str,
                            per_task=_per_task("lora_dims"), keywords=(SEARCH,)),
        "adapter_dims": Option("auto", "adapter width per block (auto: as prompt_dims)", type=str,
                               per_task=_per_task("adapter_dims"), keywords=(SEARCH,)),
        "dim_choices": Option("1,5,10", "the search space's sizes (supernet-B_prompt_VTAB.yaml:11-22)", type=str),
        "depth_choices": Option("auto", "the search space's depths in blocks (auto: quarters of the depth; NOAH's 3,6,9,"
                                        "12 on ViT-B)", type=str),
        "super_prompts": Option(100, "prompt tokens of the supernet's tensors: the prompts' xavier bound and NOAH's "
                                     "count (supernet yaml VISUAL_PROMPT_DIM: 100)", min=1),
        "param_limit": Option(0.64, "the search's limit on NOAH's count, in millions (evolution.py --param-limits "
                                    "default; the VTAB script passes it as $1 without a published value)", min=0.0),
        "population": Option(50, "candidates per generation (evolution.py --population-num)", min=1),
        "select": Option(10, "parents: the best kept (--select-num)", min=1),
        "mutation": Option(25, "mutants per generation (--mutation-num)", min=0),
        "crossover": Option(25, "crosses per generation (--crossover-num)", min=0),
        "m_prob": Option(0.2, "probability that a mutant changes a module (--m_prob)", min=0.0, max=1.0),
        "s_prob": Option(0.4, "probability that it draws a new depth (--s_prob)", min=0.0, max=1.0),
        "iterations": Option(15, "generations (configs/NOAH/VTAB/search/slurm_search_vtab.sh: --max-epochs=15)",
                             min=1),
        "supernet_epochs": Option("auto", "the supernet's epochs (auto: 5 x the protocol's; NOAH: 500 vs 100)",
                                  type=int, min=1, keywords=("auto",)),
        "supernet_lr_ratio": Option(0.5, "the supernet's lr / the retraining lr (NOAH: 5e-4 vs 1e-3)", min=0.0),
        "prompt_dropout": Option(0.1, "dropout on the prompts (supernet_train_prompt.py --drop_rate_prompt)",
                                 min=0.0, max=1.0),
        "lora_dropout": Option(0.1, "dropout on LoRA's input (--drop_rate_LoRA)", min=0.0, max=1.0),
        "adapter_dropout": Option(0.1, "dropout inside the adapters (--drop_rate_adapter)", min=0.0, max=1.0),
        "supernet": Option(False, "build the supernet (set by the pipeline's supernet and evolution stages)"),
    }

    def build(self, backbone, num_classes, opts):
        import torch

        depth = len(backbone.blocks)
        net = subnet_of(opts, depth)
        dropout = {"prompts": opts["prompt_dropout"], "lora": opts["lora_dropout"], "adapter": opts["adapter_dropout"]}
        choices = space(opts, depth) if opts.get("supernet") else None
        return NoahViT(backbone, num_classes, net, super_prompts=int(opts["super_prompts"]), dropout=dropout,
                       choices=choices, seed=torch.initial_seed())

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        opts = dict(ctx.options)
        if not searched(opts):
            return (yield from protocol.pipeline(ctx))
        sources = dict(ctx.option_sources)
        seed0 = ctx.seeds[0]
        points = protocol.search_points(ctx)
        base_search, base_final = protocol.base_hparams(ctx, "search"), protocol.base_hparams(ctx, "final")
        if "lr" not in points[0] and "lr" not in base_search:
            raise PipelineError(f"noah on {ctx.task.name}: the protocol gives the supernet no learning rate (neither a "
                                "search point nor its settings have one): pass --lr")
        lr = float(points[0].get("lr", base_search.get("lr")))
        epochs = int(base_search["epochs"])
        super_hp = {**base_search, **points[0], "lr": lr * float(opts["supernet_lr_ratio"]),
                    "epochs": 5 * epochs if opts["supernet_epochs"] == "auto" else int(opts["supernet_epochs"]),
                    "eval_every": 0}
        super_opts = {**opts, "supernet": True}
        supernet = dataclasses.replace(ctx.spec("supernet", "search", super_hp, seed0, options=super_opts,
                                                extras={"save_final": True}), option_sources=dict(sources))
        yield from job_stage(ctx, [supernet], "supernet")  # (a supernet that did not finish stops the pipeline)
        seen = {k: base_final[k] for k in ("interpolation", "mean", "std") if k in base_final}
        evolution = dataclasses.replace(
            ctx.spec("evolution", "search", {"batch_size": int(base_search["batch_size"]), **seen}, seed0,
                     job="evolution", options=super_opts,
                     extras={"init_state": f"{supernet.key}.final.safetensors"}), option_sources=dict(sources))
        found = yield from job_stage(ctx, [evolution], "evolution")
        if found is None:  # a dry run: plan with the space's largest subnet
            net = subnet_of(super_opts, ctx_depth(ctx))
        else:
            chosen = found[0].get("subnet") or {}
            if not isinstance(chosen, dict) or any(k not in chosen for k in KINDS):
                raise PipelineError(f"noah on {ctx.task.name}: the evolution run {evolution.key} recorded no whole "
                                    f"subnet (it has {sorted(chosen) if isinstance(chosen, dict) else chosen!r}); "
                                    "delete its record to search again")
            net = Subnet(*(tuple(int(v) for v in chosen[k]) for k in KINDS))
        retrain = {**opts, **net.options()}
        for k in OPTION_OF.values():
            sources[k] = f"NOAH search: evolution run {evolution.key}"

        def spec(stage, role, hp, seed):
            return dataclasses.replace(ctx.spec(stage, role, hp, seed, options=retrain), option_sources=dict(sources))

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
        depth = len(model.backbone.blocks)
        evo = Evolution(choices=space(opts, depth), depth=depth, limit=float(opts["param_limit"]),
                        population=int(opts["population"]), select=int(opts["select"]),
                        mutation=int(opts["mutation"]), crossover=int(opts["crossover"]),
                        m_prob=float(opts["m_prob"]), s_prob=float(opts["s_prob"]),
                        iterations=int(opts["iterations"]), seed=int(spec.seed))

        def score(net: Subnet) -> float:
            model.set_subnet(net)
            with torch.no_grad():
                return evaluate(model, model, data.eval_x, data.eval.labels, data.prepare, env)

        best = evo.run(score, lambda net: noah_count(net, model.dim, int(opts["super_prompts"])))
        summary = {"task": spec.task, "run": spec.key, "subnet": best.as_dict(), "val_top1": evo.scored[best]["acc"],
                   "noah_count_M": evo.scored[best]["params"], "scored": len(evo.scored), "history": evo.history,
                   "space": {k: list(v) for k, v in evo.choices.items()}, "limit_M": evo.limit}
        atomic_write_text(store.artifact_path(spec, "subnet.json"), json.dumps(summary, indent=1) + "\n")
        env.log(f"noah: {spec.task}: subnet chosen among {len(evo.scored)} scored, val top-1 "
                f"{evo.scored[best]['acc']:.2f}, {evo.scored[best]['params']:.3f}M by NOAH's count")
        return {"status": "ok", "params": params, "subnet": best.as_dict(),
                "evolution": {k: v for k, v in summary.items() if k not in ("subnet", "history")},
                "artifacts": {"subnet": f"{spec.key}.subnet.json"}}


def ctx_depth(ctx) -> int:
    """The backbone's depth, from its architecture on the meta device (a dry run builds nothing else)."""
    import torch

    from peftbench.backbones import create_backbone

    with torch.device("meta"):
        return len(create_backbone(ctx.backbone, pretrained=False).blocks)
