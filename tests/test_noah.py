"""NOAH (docs/methods/noah.md): the model against a direct computation of the official supernet's forward in float64
(ZhangYuanhan-AI/NOAH@e9c55f3 model/supernet_vision_transformer_timm.py, written out here the way that file computes
it: the input-level prompts with their position embedding, prompts appended at the end, LoRA added to q, k and v, the
adapter after the MLP), the supernet's slices, the counts, the evolutionary search draw for draw against a transcription
of evolution.py's algorithm, the released subnets, and the search pipeline end to end on the toy suite."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root
from petl_reference import inputs, layer_norm, linear, randomise, tiny_kwargs, weights

from peftbench.backbones import create_backbone
from peftbench.cli import main
from peftbench.methods import get_method
from peftbench.methods.noah.model import NoahViT, Subnet, noah_count, sample_subnet
from peftbench.methods.noah.search import Evolution
from peftbench.tasks import get_task

ensure_registered()
NET = Subnet(prompts=(2, 0, 3), lora=(1, 2, 0), adapter=(0, 3, 1))


def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(TINY_BACKBONE, pretrained=False).double()


def model_for(net: Subnet, **kw) -> NoahViT:
    bb = tiny()
    torch.manual_seed(1)
    return NoahViT(bb, 5, net, super_prompts=100, dropout={"prompts": 0.1, "lora": 0.1, "adapter": 0.1}, **kw).double()


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def noah_reference(p: dict, loras: dict, adapters: dict, prompts: dict, input_prompts, input_pos, net: Subnet, x,
                   *, depth, heads, patch):
    """NOAH's VisionTransformer.forward_features + Block.forward + Attention.forward + AdapterSuper.forward (eval)."""
    t = torch.nn.functional.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos_embed"]
    dims = net.prompts
    if dims[0] != 0:  # the input-level prompts, with their own position embedding
        t = torch.cat([t, (input_prompts[:dims[0]] + input_pos[:dims[0]]).expand(x.shape[0], -1, -1)], dim=1)
    for i in range(depth):
        q_ = f"blocks.{i}."
        last = dims[i - 1] if i > 0 else dims[0]
        if dims[i] != 0:
            tok = prompts[i][:dims[i]].expand(x.shape[0], -1, -1)
            t = torch.cat([t, tok], dim=1) if last == 0 else torch.cat([t[:, :-last], tok], dim=1)
        b, n, d = t.shape
        hd = d // heads
        h = layer_norm(t, p[q_ + "norm1.weight"], p[q_ + "norm1.bias"])
        q, k, v = linear(h, p[q_ + "attn.qkv.weight"], p[q_ + "attn.qkv.bias"]).reshape(b, n, 3, heads, hd) \
            .permute(2, 0, 3, 1, 4)
        if net.lora[i]:
            a, bm = loras[i]
            delta = linear(linear(h, a[:net.lora[i]]), bm[:, :net.lora[i]]).reshape(b, n, 3, heads, hd) \
                .permute(2, 0, 3, 1, 4)
            q, k, v = q + delta[0], k + delta[1], v + delta[2]
        att = torch.softmax((q @ k.transpose(-2, -1)) * hd ** -0.5, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        t = t + linear(o, p[q_ + "attn.proj.weight"], p[q_ + "attn.proj.bias"])
        h2 = layer_norm(t, p[q_ + "norm2.weight"], p[q_ + "norm2.bias"])
        m = linear(gelu(linear(h2, p[q_ + "mlp.fc1.weight"], p[q_ + "mlp.fc1.bias"])),
                   p[q_ + "mlp.fc2.weight"], p[q_ + "mlp.fc2.bias"])
        if net.adapter[i]:
            w0, b0, w1, b1 = adapters[i]
            a_ = net.adapter[i]
            m = m + linear(quick_gelu(linear(m, w0[:a_], b0[:a_])), w1[:, :a_], b1)
        t = t + m
    t = layer_norm(t, p["norm.weight"], p["norm.bias"])
    return t[:, 0]


def tensors_of(model: NoahViT):
    loras = {i: (m.lora_a.detach(), m.lora_b.detach()) for i, m in enumerate(model.loras) if m is not None}
    adapters = {i: (m.down.weight.detach(), m.down.bias.detach(), m.up.weight.detach(), m.up.bias.detach())
                for i, m in enumerate(model.adapters) if m is not None}
    prompts = {i: model.prompts[j].detach() for i, j in enumerate(model.prompt_index) if j is not None}
    return loras, adapters, prompts


@pytest.mark.parametrize("net", [NET, Subnet((3, 3, 1), (2, 2, 2), (1, 1, 1)), Subnet((0, 2, 0), (0, 0, 1), (2, 0, 0))],
                         ids=["mixed", "full", "sparse"])
def test_the_forward_is_noahs_maths_in_float64(net):
    model = model_for(net)
    randomise(model, std=0.3)
    base = weights(tiny())
    loras, adapters, prompts = tensors_of(model)
    g = torch.Generator().manual_seed(9)  # NOAH's input-level prompts: any values (block 0 removes them)
    extra, pos = torch.randn(3, 48, generator=g, dtype=torch.float64), torch.randn(3, 48, generator=g, dtype=torch.float64)
    x = inputs()
    with torch.no_grad():
        got = model.eval().features(x)
        want = noah_reference(base, loras, adapters, prompts, extra, pos, net, x, **tiny_kwargs(model.backbone))
    assert (got - want).abs().max().item() < 1e-12


def test_the_supernet_runs_a_subnet_as_its_slices_and_samples_in_training_mode():
    largest = Subnet.uniform(3, 4)
    sup = model_for(largest, choices={"dims": (1, 2, 4), "depths": (1, 2, 3)}, seed=5)
    randomise(sup, std=0.3)
    sup.set_subnet(NET)
    own = model_for(NET)
    with torch.no_grad():  # the subnet model holding the supernet's first rows/columns
        for i, j in enumerate(own.prompt_index):
            if j is not None:
                own.prompts[j].copy_(sup.prompts[sup.prompt_index[i]][:NET.prompts[i]])
        for i, m in enumerate(own.loras):
            if m is not None:
                m.lora_a.copy_(sup.loras[i].lora_a[:NET.lora[i]])
                m.lora_b.copy_(sup.loras[i].lora_b[:, :NET.lora[i]])
        for i, m in enumerate(own.adapters):
            if m is not None:
                a = NET.adapter[i]
                m.down.weight.copy_(sup.adapters[i].down.weight[:a])
                m.down.bias.copy_(sup.adapters[i].down.bias[:a])
                m.up.weight.copy_(sup.adapters[i].up.weight[:, :a])
                m.up.bias.copy_(sup.adapters[i].up.bias)
        own.head.load_state_dict(sup.head.state_dict())
        x = inputs()
        assert torch.equal(sup.eval()(x), own.eval()(x))
    # training mode: a new subnet before every forward, drawn as sample_configs draws it
    rng = random.Random(5)
    sup.train()
    seen = []
    for _ in range(4):
        sup(inputs().double())
        seen.append(sup.active)
        assert sup.active == sample_subnet(rng, sup.choices, 3)
    assert len(set(seen)) > 1
    with pytest.raises(ValueError, match="exceeds the built"):
        own.set_subnet(Subnet.uniform(3, 4))


def test_counts_equal_the_formula_and_noahs_count():
    """The released CIFAR-100 subnet on ViT-B/16: prompts 69 x 768, LoRA 47 x 4 x 768, adapters 74 x 2 x 768 + 74 +
    12 x 768; NOAH's count adds the input-level prompts (10 x 768) and their position embedding (100 x 768)."""
    m = get_method("noah")
    opts, sources = m.resolve_options(m.parse_options({}), get_task("cifar100"))
    assert opts["prompt_dims"] == "10 5 10 1 5 1 10 1 10 5 1 10" and "ViT-B_prompt_cifar100.yaml" in sources["prompt_dims"]
    with torch.device("meta"):
        model = m.build(create_backbone("vit_base_patch16_224", pretrained=False), 100, opts)
    expected = 69 * 768 + 47 * 4 * 768 + (74 * 2 * 768 + 74 + 12 * 768)
    assert model.parameter_counts()["trainable_without_head"] == expected == 320_330
    assert noah_count(model.largest, 768, 100) == expected + 10 * 768 + 100 * 768 == 404_810
    assert noah_count(model.largest, 768, 100) / 1e6 < 0.64  # within the search's default limit


def test_released_subnets_cover_vtab_and_other_tasks_search():
    m = get_method("noah")
    from peftbench.tasks import get_suite

    for task in get_suite("vtab").tasks:
        opts, _ = m.resolve_options(m.parse_options({}), get_task(task))
        sizes = [[int(v) for v in opts[k].split()] for k in ("prompt_dims", "lora_dims", "adapter_dims")]
        assert all(len(s) == 12 and set(s) <= {1, 5, 10} for s in sizes), task
    opts, sources = m.resolve_options(m.parse_options({}), get_task("toy"))
    assert opts["prompt_dims"] == "search" and "not in methods/noah/subnets.csv" in sources["prompt_dims"]
    with pytest.raises(ValueError, match="searched together"):
        m.build(tiny(), 3, m.parse_options({"prompt_dims": "search", "lora_dims": "1,1,1", "adapter_dims": "1,1,1"}))
    with pytest.raises(ValueError, match="3 blocks"):
        m.build(tiny(), 3, m.parse_options({"prompt_dims": "1,1", "lora_dims": "1,1", "adapter_dims": "1,1"}))


# ---------------------------------------------------------------------------------------------
# the evolution, against a transcription of evolution.py's EvolutionSearcher (tuples, python's random)
# ---------------------------------------------------------------------------------------------


def official_evolution(score, count, choices, depth, *, limit, population, select, mutation, crossover, m_prob,
                       s_prob, iterations, seed):
    random.seed(seed)
    vis, keep = {}, {select: [], 50: []}

    def decode(c):
        return c[0], list(c[1:depth + 1]), list(c[depth + 1:2 * depth + 1]), list(c[2 * depth + 1:3 * depth + 1]), \
            list(c[3 * depth + 1:])

    def legal(c):
        info = vis.setdefault(c, {})
        if "visited" in info:
            return False
        info["params"] = count(c) / 1e6
        if info["params"] > limit:
            return False
        info["acc"], info["visited"] = score(c), True
        return True

    def stack(f):
        while True:
            cands = [f() for _ in range(10)]
            for c in cands:
                vis.setdefault(c, {})
            yield from cands

    def rand():
        d = [random.choice(choices["depths"]) for _ in range(3)]
        c = [depth]
        for k in range(3):
            c += [random.choice(choices["dims"]) for _ in range(d[k])] + [0] * (depth - d[k])
        return tuple(c + [0] * depth)

    def mutate():
        c = list(random.choice(keep[select]))
        dep, *lists = decode(c)
        out = []
        for dims in lists[:3]:
            if random.random() < m_prob:
                s = random.random()
                cur = depth
                for idx, v in enumerate(dims):
                    if v == 0:
                        cur = idx
                        break
                new = random.choice(choices["depths"]) if s < s_prob else cur
                if new > cur:
                    dims = dims[:cur] + [random.choice(choices["dims"]) for _ in range(new - cur)] + [0] * (depth - new)
                else:
                    dims = dims[:new] + [0] * (depth - new)
            out.append(dims)
        return tuple([dep] + out[0] + out[1] + out[2] + [0] * depth)

    def cross():
        p1, p2 = decode(list(random.choice(keep[select]))), decode(list(random.choice(keep[select])))
        final = sum((random.choice([i, j]) for i, j in zip(p1[1:], p2[1:])), [])
        return tuple([p1[0]] + final)

    def gen(f, num):
        res, it, tries = [], stack(f), 10 * num
        while len(res) < num and tries > 0:
            tries -= 1
            c = next(it)
            if legal(c):
                res.append(c)
        return res

    cands = []

    def fill():
        it = stack(rand)
        while len(cands) < population:
            c = next(it)
            if legal(c):
                cands.append(c)

    fill()
    for epoch in range(iterations):
        for k in (select, 50):
            t = keep[k] + cands
            t.sort(key=lambda c: vis[c]["acc"], reverse=True)
            keep[k] = t[:k]
        best = keep[select][0]
        cands = gen(mutate, mutation) + gen(cross, crossover)
        fill()
    return best, {c for c, v in vis.items() if "acc" in v}


def as_tuple(net: Subnet, depth: int) -> tuple:
    return tuple([depth, *net.prompts, *net.lora, *net.adapter] + [0] * depth)


def test_the_evolution_is_evolution_py_draw_for_draw():
    depth, choices = 4, {"dims": (1, 5, 10), "depths": (1, 2, 3, 4)}

    def acc_of(t):  # a deterministic score with ties: it rewards some sizes and punishes others
        return float((sum(t[1:5]) * 7 + sum(t[5:9]) * 3 - sum(t[9:13]) * 2) % 23)

    def count_of(t):
        return noah_count(Subnet(tuple(t[1:5]), tuple(t[5:9]), tuple(t[9:13])), 48, 100)

    kw = dict(limit=0.012, population=12, select=4, mutation=6, crossover=6, m_prob=0.5, s_prob=0.5, iterations=4,
              seed=3)
    want, want_scored = official_evolution(acc_of, count_of, choices, depth, **kw)
    evo = Evolution(choices=choices, depth=depth, min_limit=0.0, **kw)
    got = evo.run(lambda n: acc_of(as_tuple(n, depth)), lambda n: count_of(as_tuple(n, depth)))
    assert as_tuple(got, depth) == want
    assert {as_tuple(n, depth) for n in evo.scored} <= want_scored  # (the official one also scores a last generation)
    assert all(v["params"] <= kw["limit"] for v in evo.scored.values())
    assert evo.scored[got]["acc"] == max(v["acc"] for v in evo.scored.values())


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


def test_the_search_pipeline_runs_end_to_end_and_retrains_the_chosen_subnet(tmp_path, capsys):
    root = make_data_root(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ["run", "--methods", "noah", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
            "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "0,1",
            "--epochs", "1", "--batch-size", "16", "--quiet", "--set", "noah.population=6", "--set",
            "noah.iterations=2", "--set", "noah.mutation=3", "--set", "noah.crossover=3", "--set", "noah.select=3"]
    assert main([*args, "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert "noah" in planned
    assert main(args) == 0
    recs = {}
    for p in Path(runs, "noah", "toy").glob("*.json"):
        if "." not in p.stem:
            r = json.loads(p.read_text())
            recs.setdefault(r["spec"]["stage"], []).append(r)
    assert sorted(recs) == ["evolution", "final", "supernet"] and len(recs["final"]) == 2
    (sup,), (evo,) = recs["supernet"], recs["evolution"]
    assert sup["spec"]["options"]["supernet"] is True and sup["spec"]["hparams"]["epochs"] == 5
    assert sup["spec"]["train_split"] == "train800" and evo["spec"]["eval_split"] == "val200"
    assert (runs / "noah" / "toy" / f"{sup['key']}.final.safetensors").is_file()
    assert evo["spec"]["extras"]["init_state"] == f"{sup['key']}.final.safetensors"
    chosen = evo["subnet"]
    summary = json.loads((runs / "noah" / "toy" / f"{evo['key']}.subnet.json").read_text())
    assert summary["subnet"] == chosen and summary["scored"] >= 6
    for final in recs["final"]:
        opts = final["spec"]["options"]
        assert opts["prompt_dims"] == ",".join(map(str, chosen["prompts"])) and not opts["supernet"]
        assert opts["lora_dims"] == ",".join(map(str, chosen["lora"]))
        assert evo["key"] in final["spec"]["option_sources"]["prompt_dims"]
        assert final["spec"]["eval_split"] == "test" and final["status"] == "ok"


def test_a_released_subnet_trains_without_a_search():
    from helpers import plan_contexts

    from peftbench.sweep.drive import count_runs

    (ctx,) = plan_contexts("noah", "cifar100", "fixed")
    specs = count_runs([ctx])
    assert {s.stage for s in specs} == {"final"} and specs[0].options["lora_dims"].startswith("10 1 5 5")
    (ctx,) = plan_contexts("noah", "demo_digits", "demo")  # no released subnet: the search, planned with placeholders
    assert [s.stage for s in count_runs([ctx])][:2] == ["supernet", "evolution"]


def test_stochastic_depth_goes_inside_the_adapter_wrapper():
    """x + adapter(drop_path(mlp(norm2(x)))): the recipe's DropPath is put where NOAH's block has it."""
    from timm.layers import DropPath

    from peftbench.layers.timm_parts import add_drop_path
    from peftbench.methods.noah.model import AdapterAfterDropPath

    model = model_for(NET)
    added = add_drop_path(model.backbone, 0.2)
    wrapped = model.backbone.blocks[1].drop_path2
    assert isinstance(wrapped, AdapterAfterDropPath) and isinstance(wrapped.drop_path, DropPath)
    assert wrapped.drop_path in added and isinstance(model.backbone.blocks[1].drop_path1, DropPath)


def test_an_evolution_record_without_a_subnet_is_a_one_line_error():
    """The retraining reads the chosen subnet from the evolution job's record: a record without a whole one stops the
    pipeline with a one-line PipelineError naming the run, not a KeyError."""
    import dataclasses
    from types import SimpleNamespace

    from helpers import plan_contexts

    from peftbench.errors import PipelineError
    from peftbench.methods import get_method
    from peftbench.store import RunStatus
    from peftbench.sweep.protocols import get_protocol

    (ctx,) = plan_contexts("noah", "demo_digits", "demo")
    ctx = dataclasses.replace(ctx, dry_run=False)
    gen = get_method("noah").pipeline(ctx, get_protocol("demo"))
    (supernet,) = next(gen)
    (evolution,) = gen.send([SimpleNamespace(status=RunStatus.OK, error=None)])
    assert evolution.job == "evolution"
    with pytest.raises(PipelineError, match=f"the evolution run {evolution.key} recorded no whole subnet") as err:
        gen.send([SimpleNamespace(status=RunStatus.OK, error=None, get=lambda k, d=None: {"prompts": [1]})])
    assert "\n" not in str(err.value)
