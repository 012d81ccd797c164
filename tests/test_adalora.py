"""AdaLoRA (peft's AdaLoraModel) trained by peftbench's loop exactly as peft documents it, and the loop's per-step
hooks (TunedViT.start_training / step_loss / after_step / step_state) that make it possible.

The reference is peft itself: ``AdaLoraModel.forward`` adds the orthogonality penalty to an output's ``loss``, and
``update_and_allocate(step)`` runs after every ``optimizer.step()``. peftbench's step (its loss plus the model's
``step_loss``, then ``after_step``) must give the same tensors, float64, step for step, through every phase of the
budget schedule (warm-up, shrinking, the final mask, training with the ranks fixed)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, make_data_root
from torch import nn

from peftbench.methods import get_method
from peftbench.train.loop import RunData, SingleStep

NUM_CLASSES = 5


def tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=0, global_pool="token")


class LossModel(nn.Module):
    """A classifier whose forward returns an output with a ``loss``, as peft's AdaLoraModel.forward expects."""

    def __init__(self, vit: nn.Module, head: nn.Module):
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, x, y):
        logits = self.head(self.vit.forward_head(self.vit.forward_features(x), pre_logits=True))
        return SimpleNamespace(loss=F.cross_entropy(logits.float(), y))  # (peftbench's loss is fp32 as well)


def _reference(model, opts):
    """peft's AdaLoraModel on a copy of ``model``'s frozen ViT, with ``model``'s initial adapter and head."""
    import peft
    from peft.tuners.adalora import AdaLoraModel

    vit = tiny_vit()  # (float32 as peftbench builds it; float64 after the injection, as ``model`` was made)
    plain = {k.replace("base_layer.", ""): v.float() for k, v in model.backbone.state_dict().items()
             if "lora_" not in k and "ranknum" not in k}
    vit.load_state_dict(plain)
    ref = LossModel(vit, copy.deepcopy(model.head).float())
    config = peft.AdaLoraConfig(init_r=opts["init_r"], target_r=opts["target_r"], lora_alpha=opts["alpha"],
                                lora_dropout=0.0, deltaT=opts["delta_t"], beta1=0.85, beta2=0.85,
                                orth_reg_weight=opts["orth_reg_weight"], total_step=1_000_000, target_modules=["qkv"])
    tuner = AdaLoraModel(ref, config, "default")
    ref.double()
    ref.head.requires_grad_(True)  # (peftbench's head; with peft it would be in modules_to_save)
    with torch.no_grad():
        ours = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(ours["backbone." + n[len("vit."):]])
    return ref, tuner


@pytest.mark.parametrize("delta_t", [1, 3])
def test_adalora_trains_as_peft_documents_it(delta_t):
    torch.manual_seed(0)
    method = get_method("adalora")
    opts = method.parse_options({"init_r": "6", "target_r": "2", "delta_t": str(delta_t)})
    model = method.build(tiny_vit(), NUM_CLASSES, opts).double()
    ref, tuner = _reference(model, opts)
    total = 12  # tinit 0.1 -> step 1, tfinal 0.2 -> 2 steps: warm-up, shrinking, the final mask at 10, fixed at 11
    model.start_training(total)
    config = tuner.peft_config["default"]
    config.total_step, config.tinit, config.tfinal = total, 1, 2
    assert (model._config().tinit, model._config().tfinal) == (1, 2)

    ours = [p for p in model.parameters() if p.requires_grad]
    theirs = [p for n, p in ref.named_parameters() if p.requires_grad]
    assert len(ours) == len(theirs)
    opt_a = torch.optim.AdamW(ours, lr=0.05, weight_decay=0.01)
    opt_b = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.01)
    stepper = SingleStep(model, RunData(None, None, None, None, None, None, False, 32))
    model.train()
    ref.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(total):
        x = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
        (loss,) = stepper.train_step(x, y, [opt_a], [0], torch.device("cpu"), step=step)
        out = tuner(x, y)  # peft: the orthogonality penalty added to the output's loss
        opt_b.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_b.step()
        tuner.update_and_allocate(step)
        assert loss == pytest.approx(out.loss.item(), rel=1e-6)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), step
    pattern = model._config().rank_pattern
    assert pattern and pattern == {k[len("vit."):]: v for k, v in config.rank_pattern.items()}
    kept = sum(sum(v) for v in pattern.values())
    assert kept == opts["target_r"] * len(pattern)  # the final budget: target_r per layer on average
    for name, keep in pattern.items():  # the masked singular values are zero
        e = dict(model.backbone.named_parameters())[name]
        assert torch.all(e[~torch.tensor(keep)] == 0)


def test_the_orthogonality_penalty_is_peft_s():
    torch.manual_seed(0)
    method = get_method("adalora")
    model = method.build(tiny_vit(), NUM_CLASSES, method.parse_options({})).double()
    pen = model.step_loss(torch.zeros(1)).detach()
    model.requires_grad_(False)
    want = 0
    mats = [p for n, p in model.backbone.named_parameters() if "lora_A" in n or "lora_B" in n]
    for n, p in model.backbone.named_parameters():
        if "lora_A" in n:
            want = want + torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0], dtype=p.dtype))
        elif "lora_B" in n:
            want = want + torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], dtype=p.dtype))
    assert pen.item() == pytest.approx(0.5 * want.item() / len(mats), rel=1e-12)
    assert method.build(tiny_vit(), NUM_CLASSES, method.parse_options({"orth_reg_weight": "0"})).step_loss(torch.zeros(1)) is None


def test_a_run_too_short_for_its_schedule_is_refused():
    from peftbench.errors import SettingsError

    method = get_method("adalora")
    model = method.build(tiny_vit(), NUM_CLASSES, method.parse_options({"tinit": "0.5", "tfinal": "0.5"}))
    with pytest.raises(SettingsError, match="tinit 0.5 and tfinal 0.5 leave no step"):
        model.start_training(10)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def test_an_interrupted_adalora_run_resumes_bit_for_bit(data_root, tmp_path):
    """The allocator's averages and the rank pattern are in the checkpoint: killed after epoch 2 of 3 and resumed, the
    run's history and tensors equal an uninterrupted run's. The loop refuses to fuse it."""
    from test_engine_store import FAST, Interrupt, records, sweep

    from peftbench.store import RunStore
    from peftbench.train.engine import Env
    from peftbench.train.loop import OnEpoch

    settings = dict(FAST, options={"adalora": {"init_r": "4", "target_r": "2"}})
    _, ref = sweep(data_root, tmp_path / "ref", methods=["adalora"], env=Env(quiet=True, checkpoint_every=1),
                   **settings)

    def kill(spec, entry):
        if entry["epoch"] == 1:
            raise Interrupt()

    with pytest.raises(Interrupt):
        sweep(data_root, tmp_path / "runs", methods=["adalora"], env=Env(quiet=True, hooks=[OnEpoch(kill)]),
              **settings)
    store = RunStore(tmp_path / "runs")
    ckpts = list((tmp_path / "runs").rglob("*.ckpt.safetensors"))
    assert ckpts
    from safetensors import safe_open

    with safe_open(str(ckpts[0]), "pt") as f:
        assert any(k.startswith("extra/step/exp_avg_ipt/") or "step/exp_avg_ipt/" in k for k in f.keys())
    sweep(data_root, tmp_path / "runs", methods=["adalora"], **settings)
    (done,) = records(store)
    (want,) = records(ref)
    assert done["status"] == "ok" and done["attempts"] == 2
    assert done["history"] == want["history"]
    assert done["metrics"] == want["metrics"]


def test_a_model_with_step_hooks_is_never_fused(data_root, tmp_path, monkeypatch):
    """adalora is not fusable; a method that says it is (a plugin's mistake) but whose model has per-step hooks (which
    keep per-model state) is refused by the loop before any step."""
    import dataclasses

    from test_engine_store import FAST

    from peftbench.api.schema import Sweep
    from peftbench.store import RunStore
    from peftbench.sweep.drive import count_runs
    from peftbench.sweep.plan import plan
    from peftbench.train.engine import Env
    from peftbench.train.fused import CannotFuse
    from peftbench.train.loop import train_group

    settings = dict(FAST, options={"adalora": {"init_r": "4", "target_r": "2"}})
    (spec,) = count_runs(plan(Sweep(methods=["adalora"], suite="testsuite", data_root=str(data_root),
                                    backbone=TINY_BACKBONE, **settings)))
    specs = [spec, dataclasses.replace(spec, hparams={**spec.hparams, "lr": 2 * spec.hparams["lr"]})]
    assert not get_method("adalora").fusable
    monkeypatch.setattr(type(get_method("adalora")), "fusable", True)
    with pytest.raises(CannotFuse, match="per-step hooks"):
        train_group(specs, RunStore(tmp_path / "runs"), Env(quiet=True))
