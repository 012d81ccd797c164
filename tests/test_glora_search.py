"""GLoRA with its official search (docs/methods/glora_search.md, Arnav0400/ViT-Slim@0fed674 GLoRA/): every one of the
432 configurations of a layer computes what layer.py computes (a transcription, float64); a fixed configuration's own
tensors give the supernet's output under that configuration and hold the official count; the model wraps every block
Linear (the plain-torch ViT with the formula at each Linear); the supernet draws as layer.py does; the evolution equals
a transcription of evolution_utils.py draw for draw; the stages (supernet → evolution → the chosen configuration
trained) run end to end."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, make_data_root
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli import main
from peftbench.cli.params import count
from peftbench.methods.glora_search.model import CONFIGS, GLoRALinear, config_count, decode, encode
from peftbench.methods.glora_search.search import GLoRAEvolution


def official_layer(layer: GLoRALinear, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """layer.py:31-76 (prepare_path and forward), with the supernet's tensors, ``LoRA_r`` for ``lora``."""
    r = layer.rank

    def prepare(config, xd, xu=None):
        if xu is not None:
            if config == "lora":
                return torch.matmul(xd[:, :r], xu[:r, :])
            if config == "vector":
                return xd[:, 0].unsqueeze(1)
            if config == "constant":
                return xd[0, 0]
            return torch.zeros(xd.shape[0], xu.shape[1], dtype=xd.dtype)
        if config == "vector":
            return xd
        if config == "constant":
            return xd[0]
        return torch.zeros(1, dtype=xd.dtype)

    a, b, c = (prepare(cfg[t], getattr(layer, t + "d"), getattr(layer, t + "u")) for t in "ABC")
    d, e = prepare(cfg["D"], layer.D), prepare(cfg["E"], layer.E)
    w, bias = layer.base.weight, layer.base.bias
    weight = w + w * a + b
    return F.linear(x, weight, bias + bias * d + e + torch.matmul(w, c).squeeze())


def test_every_configuration_is_layer_py():
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5).double()
    layer = GLoRALinear(base, 3).double()
    with torch.no_grad():
        for n, p in layer.named_parameters(recurse=False):
            p.copy_(torch.randn_like(p))
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    assert len(CONFIGS) == 432 and CONFIGS[0] == ("lora",) * 3 + ("constant",) * 2
    assert CONFIGS[1] == ("lora", "lora", "lora", "constant", "none")  # E varies fastest (layer.py:12-19)
    for cfg in CONFIGS:
        layer.config = cfg
        want = official_layer(layer, dict(zip("ABCDE", cfg)), x)
        assert torch.allclose(layer(x), want, rtol=1e-13, atol=1e-13), cfg


def test_a_fixed_configuration_is_the_supernet_slice_and_holds_the_official_count():
    torch.manual_seed(1)
    base = torch.nn.Linear(6, 4).double()
    sup = GLoRALinear(base, 2).double()
    with torch.no_grad():
        for p in sup.parameters(recurse=False):
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 6, dtype=torch.float64)
    for cfg in [("lora", "vector", "vector", "constant", "none"), ("constant", "none", "lora", "vector", "constant"),
                ("none", "lora", "none", "none", "vector")]:
        fixed = GLoRALinear(base, 2, cfg).double()
        with torch.no_grad():
            for n, p in fixed.named_parameters(recurse=False):
                src = getattr(sup, n)
                p.copy_(src[tuple(slice(0, s) for s in p.shape)])
        sup.config = cfg
        assert torch.allclose(fixed(x), sup(x), rtol=1e-13, atol=1e-13), cfg
        trained = sum(p.numel() for p in fixed.parameters(recurse=False))
        assert trained == config_count(cfg, 6, 4, 2)
    zero = GLoRALinear(base, 2, ("lora",) * 3 + ("vector",) * 2).double()
    assert torch.equal(zero(x), base(x))  # every path starts at 0: the pretrained layer


def test_the_model_wraps_every_block_linear(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    paths = ",".join(["LvLcv", "cnvnc", "nLnvv", "vcLcn"] * 3)
    model = build("glora-search", copy.deepcopy(tiny_backbone)).double()  # the supernet, under a configuration
    randomise(model)
    model.set_configs(decode(paths, 12))
    model.eval()
    layers = {(name, i): model.glora_layers[4 * i + j] for i in range(3) for j, name in
              enumerate(("qkv", "proj", "fc1", "fc2"))}

    def at(point):
        layer = layers[point]
        return lambda h, out: official_layer(layer, dict(zip("ABCDE", layer.config)), h)

    expect = linear(reference_features(weights(ref), inputs(), {k: at(k) for k in layers}, **tiny_kwargs(ref)),
                    model.head.weight, model.head.bias)
    with torch.no_grad():
        got = model(inputs())
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    assert encode(decode(paths, 12)) == paths
    with pytest.raises(ValueError, match="1 layer configurations, the backbone 12"):
        build("glora-search", tiny_backbone, paths="LLLvv")
    with pytest.raises(ValueError, match="layer 1"):
        build("glora-search", tiny_backbone, paths=",".join(["LLLvv", "LLcvv"] + ["nnnnn"] * 10))  # C has no constant


def test_the_supernet_draws_as_layer_py_and_the_counts(tiny_backbone):
    model = build("glora-search", copy.deepcopy(tiny_backbone))
    model._rng = random.Random(5)
    model.train()
    model(inputs().float())
    rng = random.Random(5)
    assert [layer.config for layer in model.glora_layers] == [rng.choice(CONFIGS) for _ in range(12)]
    D, r = 768, 4  # ViT-B/16: the supernet's tensors = every layer at (lora, lora, lora, vector, vector)
    per_block = sum(config_count(("lora",) * 3 + ("vector",) * 2, i, o, r)
                    for i, o in ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)))
    assert count("glora-search", 100)["trainable_without_head"] == 12 * per_block == 1_603_776


def official_evolution(score, count_m, depth, *, limit, min_limit, population, select, mutation, crossover, m_prob,
                       iterations, seed):
    """evolution_utils.py (EvolutionSearcher.search and its helpers) with the global ``random`` seeded; a candidate
    is a tuple of per-layer (A, B, C, D, E) tuples; returns the best of the select best after the last update."""
    choices = {"A": ["lora", "vector", "constant", "none"], "C": ["lora", "vector", "none"],
               "D": ["constant", "none", "vector"]}
    choices["B"], choices["E"] = choices["A"], choices["D"]
    random.seed(seed)
    vis, keep = {}, {select: [], 50: []}

    def legal(c):
        info = vis.setdefault(str(c), {})
        if "visited" in info:
            return False
        info["params"] = count_m(c)
        if info["params"] > limit or info["params"] < min_limit:
            return False
        info["acc"], info["visited"] = score(c), True
        return True

    def stack(f):
        while True:
            cands = [f() for _ in range(10)]
            for c in cands:
                vis.setdefault(str(c), {})
            yield from cands

    def rand():
        return tuple(tuple(random.choice(choices[k]) for k in "ABCDE") for _ in range(depth))

    def mutate():
        cand = list(random.choice(keep[select]))
        final = []
        for layer in cand:
            out = []
            for j, key in enumerate("ABCDE"):
                out.append(random.choice(choices[key]) if random.random() < m_prob else layer[j])
            final.append(tuple(out))
        return tuple(final)

    def cross():
        c1, c2 = list(random.choice(keep[select])), list(random.choice(keep[select]))
        return tuple(tuple(random.choice([c1[i][j], c2[i][j]]) for j in range(5)) for i in range(len(c1)))

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
    best = None
    for _ in range(iterations):
        for k in (select, 50):
            t = keep[k] + cands
            t.sort(key=lambda c: vis[str(c)]["acc"], reverse=True)
            keep[k] = t[:k]
        best = keep[select][0]
        cands = gen(mutate, mutation) + gen(cross, crossover)
        fill()
    return best, {k for k, v in vis.items() if "acc" in v}


def test_the_evolution_is_evolution_utils_draw_for_draw():
    depth = 3

    def acc_of(c):  # a deterministic score with ties
        return float(sum(len(p) * (i + 1) for i, layer in enumerate(c) for p in layer) % 17)

    def count_of(c):  # millions, as is_legal compares
        return sum(config_count(layer, 8, 8, 2) for layer in c) / 1e6

    kw = dict(limit=1.5e-4, min_limit=2e-5, population=12, select=4, mutation=6, crossover=6, m_prob=0.3,
              iterations=4, seed=7)
    want, want_scored = official_evolution(acc_of, count_of, depth, **kw)
    from peftbench.methods.glora_search.model import CHOICES

    evo = GLoRAEvolution(choices=CHOICES, depth=depth, **kw)
    got = evo.run(acc_of, lambda c: count_of(c) * 1e6)
    assert got == want
    assert {str(c) for c in evo.scored} <= want_scored
    assert all(kw["min_limit"] <= v["params"] <= kw["limit"] for v in evo.scored.values())


def test_the_search_pipeline_runs_end_to_end_and_trains_the_chosen_configuration(tmp_path, capsys):
    root = make_data_root(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ["run", "--methods", "glora-search", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
            "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "0",
            "--epochs", "1", "--batch-size", "16", "--quiet", "--set", "glora-search.population=6", "--set",
            "glora-search.iterations=2", "--set", "glora-search.mutation=3", "--set", "glora-search.crossover=3",
            "--set", "glora-search.select=3"]
    assert main([*args, "--dry-run"]) == 0
    assert "glora-search" in capsys.readouterr().out
    assert main(args) == 0
    recs: dict = {}
    for p in Path(runs, "glora-search", "toy").glob("*.json"):
        if "." not in p.stem:
            r = json.loads(p.read_text())
            recs.setdefault(r["spec"]["stage"], []).append(r)
    assert sorted(recs) == ["evolution", "final", "supernet"]
    (sup,), (evo,), (final,) = recs["supernet"], recs["evolution"], recs["final"]
    assert sup["spec"]["options"]["supernet"] is True and sup["spec"]["hparams"]["epochs"] == 5
    assert evo["spec"]["extras"]["init_state"] == f"{sup['key']}.final.safetensors"
    summary = json.loads((runs / "glora-search" / "toy" / f"{evo['key']}.paths.json").read_text())
    assert summary["paths"] == evo["paths"] == final["spec"]["options"]["paths"] and summary["scored"] >= 6
    assert evo["key"] in final["spec"]["option_sources"]["paths"] and final["status"] == "ok"
    assert len(decode(evo["paths"], 12)) == 12
