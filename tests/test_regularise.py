"""The papers' timm regularisers (SSF / GPS on FGVC): mixup / CutMix, random erasing, the model EMA and the random
resized crop, as hyper-parameters of a recipe; checked against direct computations, trained through the engine and
resumed bit for bit."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, make_data_root

from peftbench.api.schema import Sweep
from peftbench.data.transforms import random_resized_crop_flip
from peftbench.errors import SettingsError
from peftbench.store import RunStore
from peftbench.sweep.drive import count_runs
from peftbench.sweep.plan import plan
from peftbench.train.engine import Env
from peftbench.train.hparams import parse_hparams
from peftbench.train.loop import OnEpoch, rng_state, set_rng_state, train
from peftbench.train.regularise import BatchRegulariser, TrainableEMA, loss_smoothing

BASE = {"lr": 0.05, "wd": 0.0, "epochs": 3, "batch_size": 16}
SSF_FGVC = {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25, "ema_decay": 0.9, "augment": "rrc-flip",
            "drop_last": True, "label_smoothing": 0.1}


def test_the_hyper_parameters_are_checked_before_compute():
    h = parse_hparams({**BASE, **SSF_FGVC})
    assert (h.mixup, h.cutmix, h.random_erasing, h.ema_decay, h.augment) == (0.8, 1.0, 0.25, 0.9, "rrc-flip")
    assert parse_hparams(BASE).mixup == 0 and parse_hparams(BASE).augment is None  # absent: off, keys unchanged
    with pytest.raises(SettingsError, match="drop_last = true and an even batch_size"):
        parse_hparams({**BASE, "mixup": 0.8})
    with pytest.raises(SettingsError, match="drop_last = true and an even batch_size"):
        parse_hparams({**BASE, "cutmix": 1.0, "drop_last": True, "batch_size": 15})
    with pytest.raises(SettingsError, match="ema_decay=1: must be in"):
        parse_hparams({**BASE, "ema_decay": 1.0})
    with pytest.raises(SettingsError, match=r"augment.*'rrc-flp'.*Did you mean 'rrc-flip'"):
        parse_hparams({**BASE, "augment": "rrc-flp"})


def test_mixup_targets_and_loss_equal_the_direct_computation():
    """Batch mode: λ ~ Beta(α, α), the batch mixed with its reverse, targets λ·s(y) + (1 − λ)·s(y reversed) with
    s the smoothed one-hot; the loss is the soft-target cross entropy, smoothed once (not again by the loss)."""
    hp = parse_hparams({**BASE, "mixup": 0.8, "drop_last": True, "label_smoothing": 0.1, "batch_size": 8})
    reg = BatchRegulariser(hp, num_classes=5, device=torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    np.random.seed(3)
    xm, t = reg(x.clone(), y)
    np.random.seed(3)
    assert np.random.rand() < 1.0  # timm first draws whether to mix (prob 1), then λ
    lam = float(np.random.beta(0.8, 0.8))
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    smooth = lambda v: F.one_hot(v, 5).float() * (1 - 0.1) + 0.1 / 5  # noqa: E731
    assert torch.allclose(t, lam * smooth(y) + (1 - lam) * smooth(y.flip(0)), atol=1e-6)
    logits = torch.randn(8, 5)
    assert loss_smoothing(t, 0.1) == 0.0 and loss_smoothing(y, 0.1) == 0.1
    soft_ce = (-t * F.log_softmax(logits, dim=-1)).sum(-1).mean()  # timm's SoftTargetCrossEntropy
    assert torch.allclose(F.cross_entropy(logits, t, label_smoothing=loss_smoothing(t, 0.1)), soft_ce)


def test_random_erasing_draws_noise_boxes_on_the_normalised_batch():
    hp = parse_hparams({**BASE, "random_erasing": 1.0})
    reg = BatchRegulariser(hp, num_classes=5, device=torch.device("cpu"))
    x = torch.zeros(4, 3, 32, 32)
    random.seed(0)
    out, y = reg(x.clone(), torch.zeros(4, dtype=torch.long))
    changed = (out != 0).flatten(1).any(1)
    assert changed.all() and y.dtype == torch.long  # every image got a box; hard labels stay hard
    frac = (out != 0).float().mean(dim=(1, 2, 3))
    assert ((frac >= 0.02 - 1e-3) & (frac <= 1 / 3 + 1e-3)).all()  # timm's area range 2 % to 1/3


def test_the_ema_follows_the_recursion_and_is_swapped_in_and_out():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema = TrainableEMA(model, 0.9)
    assert set(ema.shadow) == {"weight", "bias"}  # the trained tensors only
    expect = {n: p.detach().clone() for n, p in ema.params.items()}
    for step in range(3):
        with torch.no_grad():
            for p in ema.params.values():
                p.add_(float(step + 1))
        ema.update()
        for n, p in ema.params.items():
            expect[n] = 0.9 * expect[n] + 0.1 * p.detach()
    live = model.weight.detach().clone()
    with ema.applied():
        assert torch.allclose(model.weight, expect["weight"]) and torch.allclose(model.bias, expect["bias"])
    assert torch.equal(model.weight, live)


def test_random_resized_crop_keeps_shape_and_reproduces_from_the_torch_generator():
    x = torch.randint(0, 256, (3, 3, 36, 36), dtype=torch.uint8)
    torch.manual_seed(5)
    a = random_resized_crop_flip(x, 32)
    torch.manual_seed(5)
    b = random_resized_crop_flip(x, 32)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    torch.manual_seed(5)  # scale (1, 1), ratio (1, 1) and no flip: the whole image resized
    c = random_resized_crop_flip(x, 36, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.equal(c, x)


def test_python_and_numpy_generators_are_part_of_the_saved_rng():
    state = rng_state(torch.device("cpu"))
    a = (random.random(), np.random.rand(), torch.rand(()).item())
    set_rng_state(state, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == a


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("regdata"))


def _spec(data_root, runs):
    contexts = plan(Sweep(methods=["vpt-deep"], suite="testsuite", tasks=["toy"], data_root=str(data_root),
                          backbone=TINY_BACKBONE, protocol="fixed", seeds=[1], epochs=3, batch_size=16, lr=[0.05],
                          wd=[0.0], runs_dir=str(runs)))
    (spec,) = count_runs(contexts)
    return dataclasses.replace(spec, hparams={**spec.hparams, **SSF_FGVC})


class Interrupt(BaseException):
    pass


def test_a_run_with_every_regulariser_trains_and_resumes_bit_for_bit(data_root, tmp_path):
    spec = _spec(data_root, tmp_path / "ref")
    ref = train(spec, RunStore(tmp_path / "ref"), Env(quiet=True))
    assert ref["data_pipeline"]["augment"] == "rrc-flip" and len(ref["history"]) == 3

    def kill(s, entry):
        if entry["epoch"] == 1:
            raise Interrupt()

    store = RunStore(tmp_path / "runs")
    with pytest.raises(Interrupt):
        train(spec, store, Env(quiet=True, hooks=[OnEpoch(kill)]))
    (ck,) = list((tmp_path / "runs").rglob("*.ckpt.safetensors"))
    from peftbench.store import checkpoints

    saved = checkpoints.load(ck)
    assert any(k.startswith("ema/") for k in saved["extra"]) and {"numpy", "python"} <= set(saved["rng"])
    random.seed(99)  # the generators a resumed run starts from are the checkpoint's, not the process's
    np.random.seed(99)
    again = train(spec, store, Env(quiet=True))
    assert again["history"] == ref["history"]
    assert again["metrics"]["top1"] == ref["metrics"]["top1"]
