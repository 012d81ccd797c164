"""The loop options of DA-VPT's recipe (docs/protocols.md §5): the class-balanced sampler equals the official
``ClassSampler`` batch for batch, the per-update cosine equals timm's scheduler stepped per update, gradient clipping
and the head's own weight decay are what torch and the official param groups do, a method's extra loss runs under the
forward's autocast, and a card asking for all of them trains end to end."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.cli import main
from peftbench.data.samplers import SAMPLERS, class_balanced, sampler_order
from peftbench.errors import SettingsError
from peftbench.train.hparams import parse_hparams
from peftbench.train.optim import build_optimizer, clip_gradients, lr_at_update

ensure_registered()
BASE = {"lr": 0.1, "wd": 0.0, "epochs": 3, "batch_size": 32}


class OfficialClassSampler:
    """Noahsark/DA-VPT@1a5ac609:Dataset/class_sampler.py:11-70 written out (its ``random`` module calls on a
    ``random.Random``), over the image dict VTAB_txt.py:29-33 builds from a split list."""

    def __init__(self, labels: list[int], batch_size: int, samples_per_class: int, rng: random.Random):
        self.image_dict: dict[int, list] = {}
        for i, label in enumerate(labels):
            if label not in self.image_dict:
                self.image_dict[label] = []
            self.image_dict[label].append([f"img{i}.jpg", i])
        self.classes = list(self.image_dict.keys())
        self.batch_size, self.samples_per_class = batch_size, samples_per_class
        self.sampler_length = len(labels) // batch_size
        self.random = rng

    def _smart_sample(self, S, N):
        M = len(S)
        if N <= M:
            return self.random.sample(S, N)
        multiple_samples, remaining_samples = N // M, N % M
        result = []
        for _ in range(multiple_samples):
            result.extend(S)
        result.extend(self.random.sample(S, remaining_samples))
        self.random.shuffle(result)
        return result

    def __iter__(self):
        for _ in range(self.sampler_length):
            subset = []
            for cls in self._smart_sample(self.classes, self.batch_size // self.samples_per_class):
                subset.extend([s[-1] for s in self._smart_sample(self.image_dict[cls], self.samples_per_class)])
            yield subset


@pytest.mark.parametrize("classes,n,batch,k", [(102, 1000, 32, 2), (5, 1000, 32, 2), (3, 50, 16, 4), (40, 120, 32, 8)])
def test_class_balanced_batches_are_the_official_samplers(classes, n, batch, k):
    gen = torch.Generator().manual_seed(classes)
    labels = torch.randint(0, classes, (n,), generator=gen)  # (classes in no particular order, uneven sizes)
    seed, epoch = 3, 5
    ours = class_balanced(labels, seed, epoch, batch, k)
    official = OfficialClassSampler(labels.tolist(), batch, k, random.Random(seed * 1_000_003 + epoch))
    expected = [i for b in official for i in b]
    assert ours.tolist() == expected  # batch for batch, image for image
    assert len(ours) == SAMPLERS.get("class-balanced").length(n, batch) == n // batch * batch
    for b in ours.view(-1, batch):
        per_class = torch.bincount(labels[b], minlength=classes)
        drawn = per_class[per_class > 0]
        assert (drawn % k == 0).all()  # k images of every drawn class (more when a class is drawn twice)
        if classes >= batch // k:
            assert len(drawn) == batch // k and (drawn == k).all()  # distinct classes while there are enough


def test_samplers_depend_on_the_seed_and_epoch_only():
    labels = torch.arange(200) % 7
    for name in ("shuffle", "class-balanced"):
        a = sampler_order(name, labels, 1, 0, 16, 2)
        assert torch.equal(a, sampler_order(name, labels, 1, 0, 16, 2))  # a resumed epoch sees the same order
        assert not torch.equal(a, sampler_order(name, labels, 1, 1, 16, 2))
        assert not torch.equal(a, sampler_order(name, labels, 2, 0, 16, 2))
    assert sorted(sampler_order("shuffle", labels, 1, 0, 16, 2).tolist()) == list(range(200))


def test_the_per_update_cosine_is_timms_scheduler_stepped_per_update():
    from timm.scheduler import CosineLRScheduler

    epochs, warmup, steps, peak, warmup_lr, min_lr = 10, 2, 7, 0.05, 1e-6, 1e-8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=epochs * steps, lr_min=min_lr, warmup_lr_init=warmup_lr,
                              warmup_t=warmup * steps, t_in_epochs=False)  # timm's create_scheduler, sched_on_updates
    seen = []
    for u in range(epochs * steps):
        seen.append(opt.param_groups[0]["lr"])  # the lr update u trains at
        sched.step_update(num_updates=u + 1)  # the official loop: after every update
    ours = [lr_at_update(u, steps, peak, epochs, warmup, warmup_lr, min_lr) for u in range(epochs * steps)]
    assert ours == pytest.approx(seen, rel=1e-12, abs=0)


def test_gradient_clipping_by_value_and_by_norm(tiny_backbone):
    from peftbench.train.loop import train_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    x, y = torch.randn(8, 6) * 50, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ref = torch.nn.Linear(6, 3)
    ref.load_state_dict(layer.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    before = [p.detach().clone() for p in layer.parameters()]
    grads = [p.grad.clone() for p in ref.parameters()]
    assert max(g.abs().max() for g in grads) > 0.1  # the clip bites
    train_step(layer, x, y, torch.optim.SGD(layer.parameters(), lr=1.0), torch.device("cpu"), clip=(0.1, "value"))
    for p, b, g in zip(layer.parameters(), before, grads):
        assert torch.allclose(p, b - g.clamp(-0.1, 0.1), atol=1e-7)  # clip_grad_value_: every element
    total = torch.cat([g.flatten() for g in grads]).norm()
    opt = torch.optim.SGD([torch.nn.Parameter(g.clone()) for g in grads], lr=1.0)
    for p, g in zip(opt.param_groups[0]["params"], grads):
        p.grad = g.clone()
    clip_gradients(opt, 0.1, "norm")
    for p, g in zip(opt.param_groups[0]["params"], grads):
        assert torch.allclose(p.grad, g * 0.1 / total, atol=1e-7)  # the total norm scaled down to 0.1


def test_the_heads_own_weight_decay_is_the_official_param_groups(tiny_backbone):
    from peftbench.methods import get_method

    m = get_method("bitfit")
    model = m.build(tiny_backbone, 3, m.resolve_options(m.default_options(), None)[0])
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    plain = build_optimizer("adamw", model, 1e-3, 0.05)
    opt = build_optimizer("adamw", model, 1e-3, 0.05, head_wd=3.0)
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd == {**{names[id(p)]: g["weight_decay"] for g in plain.param_groups for p in g["params"]},
                  "head.weight": 3.0}  # only the head's decayed weight moves (utils.py:125-165: its bias never decays)
    assert wd["head.bias"] == 0.0 and len(wd) == len(names) == sum(len(g["params"]) for g in opt.param_groups)
    # with weight decay 0 the head still gets its own (DA-VPT's dmlab: weight_decay 0, wd_head 0.05)
    zero = build_optimizer("adamw", model, 1e-3, 0.0, head_wd=0.05)
    wd0 = {names[id(p)]: g["weight_decay"] for g in zero.param_groups for p in g["params"]}
    assert wd0["head.weight"] == 0.05 and wd0["head.bias"] == 0.0
    assert all(v == 0.0 for n, v in wd0.items() if n != "head.weight")


def test_a_methods_extra_loss_runs_under_the_forwards_autocast():
    from peftbench.train.loop import train_step

    seen = []
    layer = torch.nn.Linear(4, 3)

    def extra(y):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer.weight.sum() * 0

    train_step(layer, torch.randn(2, 4), torch.tensor([0, 1]), torch.optim.SGD(layer.parameters(), lr=0.1),
               torch.device("cpu"), "bf16", extra_loss=extra)
    assert seen == [True]


@pytest.mark.parametrize("hp,needle", [
    ({"sampler": "class-balance"}, "Did you mean 'class-balanced'"),
    ({"sampler": "class-balanced", "samples_per_class": 5}, "samples_per_class=5: must be at least 1 and divide"),
    ({"samples_per_class": 4}, "samples_per_class belongs to a sampler other than shuffle"),
    ({"schedule_per_update": True}, "schedule_per_update belongs to schedule timm-cosine"),
    ({"schedule": "timm-cosine", "schedule_per_update": True, "schedule_lag": 1}, "drop schedule_lag"),
    ({"clip_grad": -1.0}, "clip_grad=-1: must not be negative"),
    ({"clip_grad": 1.0, "clip_mode": "agc"}, "clip_mode='agc': expected one of norm, value"),
    ({"clip_mode": "value"}, "clip_mode belongs to clip_grad > 0"),
    ({"head_wd": -0.1}, "head_wd=-0.1: must not be negative"),
])
def test_bad_loop_options_are_one_line_errors(hp, needle):
    with pytest.raises(SettingsError, match=needle):
        parse_hparams({**BASE, **hp})
    assert parse_hparams(BASE).sampler == "shuffle" and parse_hparams(BASE).head_wd is None  # absent: the defaults
    assert parse_hparams({**BASE, "batch_size": 25}).batch_size == 25  # an odd batch is fine without the sampler
    assert parse_hparams({**BASE, "sampler": "class_balanced", "samples_per_class": 4}).samples_per_class == 4


def test_a_card_with_da_vpts_loop_options_trains_end_to_end(capsys, tmp_path):
    """The tests' card gives ln-tune the class-balanced sampler, the per-update cosine, value clipping, a head weight
    decay and bf16: the run trains n // batch steps per epoch at the per-update lrs."""
    root = make_data_root(tmp_path / "data")
    runs = tmp_path / "runs"
    code = main(["run", "--methods", "ln-tune", "--suite", "testsuite", "--tasks", "toy", "--protocol", "paper",
                 "--data-root", str(root), "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--quiet"])
    assert code == 0, capsys.readouterr().err
    (rec,) = [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*/*/*.json")) if "." not in p.stem]
    hp = rec["spec"]["hparams"]
    assert (hp["sampler"], hp["samples_per_class"], hp["clip_grad"], hp["head_wd"]) == ("class-balanced", 4, 0.5, 3.0)
    steps = 64 // 16  # 64 training images
    assert rec["timing"]["train_images"] == 3 * steps * 16
    lrs = [h["lr"] for h in rec["history"]]
    assert lrs == [pytest.approx(lr_at_update(e * steps, steps, 0.01, 3, 1, 1e-4, 0.0)) for e in range(3)]
    assert lrs[0] == pytest.approx(1e-4) and 1e-4 < lrs[1] < 0.01  # the warm-up is stepped per update


def test_flip_then_randaugment_is_scts_timm_transform():
    """``flip-rand-m9-mstd0.5-inc1`` equals SCT's training transform (showlab/SCT@384cecb vtab.py:55-74: timm's
    create_transform with RandAugment and bicubic, its crop replaced by Resize((S, S), bicubic)) image for image, the
    generators seeded alike."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform
    from torchvision import transforms

    from peftbench.data.transforms import AUGMENT

    size = 32
    official = create_transform(input_size=(size, size), is_training=True, color_jitter=0.4,
                                auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0, re_mode="pixel", re_count=1,
                                interpolation="bicubic")
    official.transforms[0] = transforms.Resize((size, size), interpolation=3)  # (the stored images are S x S)
    x = torch.randint(0, 256, (12, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def seed():
        torch.manual_seed(5), np.random.seed(5), random.seed(5)

    seed()
    ours = AUGMENT.get("flip-rand-m9-mstd0.5-inc1")(size)(x)
    seed()
    expected = torch.stack([official(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert torch.allclose((ours.float() / 255 - mean) / std, expected, atol=1e-5)
    assert not torch.equal(ours, x)  # it changed the images
