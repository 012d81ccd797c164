"""Optimisers and the per-epoch schedule of the VPT/E^2VPT code (docs/protocols.md §5, §4.2)."""
import math

import pytest
import torch

from peftbench.methods import get_method
from peftbench.train.optim import build_optimizer, effective_lr, lr_at_epoch


def test_warmup_then_cosine_stepped_per_epoch():
    peak, E, W = 1.0, 100, 10
    assert lr_at_epoch(0, peak, E, W) == 0.0  # epoch 0 runs at lr 0 (factor e/W)
    assert lr_at_epoch(5, peak, E, W) == pytest.approx(0.5)
    assert lr_at_epoch(10, peak, E, W) == pytest.approx(1.0)
    assert lr_at_epoch(55, peak, E, W) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at_epoch(99, peak, E, W) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_lr_scaled_by_batch_over_256():
    assert effective_lr(2.5, 64) == pytest.approx(0.625)
    assert effective_lr(0.1, 128) == pytest.approx(0.05)


def _model(tiny_backbone, name):
    m = get_method(name)
    return m.build(tiny_backbone, 3, m.resolve_options(m.default_options(), None)[0])


def test_sgd_excludes_head_bias_from_weight_decay(tiny_backbone):
    model = _model(tiny_backbone, "vpt-deep")
    opt = build_optimizer("sgd", model, 0.1, 0.01)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.head.bias)] == 0.0
    assert decays[id(model.head.weight)] == 0.01 and decays[id(model.prompt_embeddings)] == 0.01


def test_full_finetune_optimizer_quirk(tiny_backbone):
    model = _model(tiny_backbone, "full")
    opt = build_optimizer("vpt-adamw", model, 1e-3, 0.0001)  # grid value ignored: fixed 0.01
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-6
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if "bias" in names[id(p)] else 0.01)
    opt0 = build_optimizer("vpt-adamw", model, 1e-3, 0.0)  # wd 0 falls through to SGD
    assert isinstance(opt0, torch.optim.SGD)


@pytest.mark.parametrize("lag, epochs, t_initial, warmup, warmup_lr, min_lr", [
    (1, 100, 100, 10, 1e-6, 1e-5),  # NOAH (timm 0.5.4 defaults, step(epoch) after the epoch)
    (0, 110, 100, 10, 1e-7, 1e-8),  # SSF (step(epoch + 1), 10 cool-down epochs at the floor)
    (1, 12, 8, 3, 0.0, 0.0),
])
def test_timm_cosine_equals_timms_own_scheduler(lag, epochs, t_initial, warmup, warmup_lr, min_lr):
    """timm's CosineLRScheduler, stepped as the official loops step it, gives every epoch's lr of
    ``schedule = timm-cosine`` with that lag (docs/protocols.md §5)."""
    from timm.scheduler import CosineLRScheduler

    peak = 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=t_initial, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                              cycle_limit=1, t_in_epochs=True, warmup_prefix=False)
    for epoch in range(epochs):
        used = opt.param_groups[0]["lr"]  # what this epoch trains at
        ours = lr_at_epoch(epoch, peak, epochs, warmup, warmup_lr, min_lr, "timm-cosine", t_initial, lag)
        assert ours == pytest.approx(used, rel=1e-12, abs=1e-15), epoch
        sched.step(epoch + 1 - lag)  # after the epoch: step(epoch) (lag 1) or step(epoch + 1) (lag 0)


def test_adamw_all_decays_every_trainable_tensor(tiny_backbone):
    """FacT, Convpass and RepAdapter call AdamW(trainable, lr, weight_decay): the head's bias is decayed too."""
    model = _model(tiny_backbone, "bitfit")
    opt = build_optimizer("adamw-all", model, 1e-3, 1e-4)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-8
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert any(p is model.head.bias for p in opt.param_groups[0]["params"])
