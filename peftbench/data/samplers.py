"""Epoch samplers: the order in which an epoch visits the training images (``HParams.sampler``), a registry.

The training loop cuts an epoch's order into consecutive batches (:func:`peftbench.data.loader.batches`), so a
sampler decides both which images an epoch sees and how they are grouped into batches. Every sampler is a pure
function of the run's seed and the epoch (its own generator, re-seeded per epoch): a resumed run sees the same
orders as an uninterrupted one, and fused configurations (one seed) share them.

* ``shuffle`` (the default; absent from a run's hyper-parameters): a permutation of the ``n`` images,
  :func:`peftbench.data.loader.epoch_order` (a DataLoader's ``shuffle=True``).
* ``class-balanced``: ``n // batch_size`` batches, each of ``batch_size / samples_per_class`` classes drawn at
  random and ``samples_per_class`` images of each (DA-VPT's ``ClassSampler``, Noahsark/DA-VPT@1a5ac609:
  Dataset/class_sampler.py:11-70). Within a batch the classes are drawn without replacement while there are
  enough of them, and a class's images without replacement while it has enough (its ``_smart_sample``: else every
  member repeats ``N // M`` times plus a draw without replacement of the rest, shuffled). The classes are listed in
  the order of their first image in the split, each class's images in split order (``VTAB_txt.py:30-34``), and
  the draws are those of ``random.Random`` in the official order of calls, so that, seeded alike, the batches are
  the official sampler's batch for batch (tests/test_samplers.py). The official sampler draws from Python's global
  generator, seeded once per process (``utils.py:22``) and continued across epochs; here each epoch re-seeds its own.
  An image may occur twice in an epoch and another not at all, as in the official code.

Register one with :func:`register_sampler` (the built-ins live here; third-party packages use the
``peftbench.samplers`` entry-point group).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from .._registry import Registry
from .loader import ORDER_SEED_FACTOR, epoch_order


@dataclass(frozen=True)
class Sampler:
    """``order(labels, seed, epoch, batch_size, samples_per_class)``: the epoch's indices into the split, cut into
    batches of ``batch_size`` by the loop; ``length(n, batch_size)``: how many indices every epoch's order holds
    (known before training: the schedule's steps per epoch)."""

    order: Callable[[torch.Tensor, int, int, int, int], torch.Tensor]
    length: Callable[[int, int], int]
    doc: str = ""


SAMPLERS: Registry[Sampler] = Registry("sampler", group="peftbench.samplers")


def register_sampler(name: str, length: Callable[[int, int], int], doc: str = ""):
    def deco(fn):
        SAMPLERS.add(name, Sampler(fn, length, doc))
        return fn
    return deco


@register_sampler("shuffle", lambda n, batch_size: n, "a permutation of the split (the default)")
def _shuffle(labels: torch.Tensor, seed: int, epoch: int, batch_size: int, samples_per_class: int) -> torch.Tensor:
    return epoch_order(seed, epoch, len(labels))


def smart_sample(rng: random.Random, items: list, n: int) -> list:
    """``n`` of ``items``: without replacement when there are enough, else every item ``n // len`` times plus
    ``n % len`` drawn without replacement, shuffled (DA-VPT's ``ClassSampler._smart_sample``)."""
    if n <= len(items):
        return rng.sample(items, n)
    out = []
    for _ in range(n // len(items)):
        out.extend(items)
    out.extend(rng.sample(items, n % len(items)))
    rng.shuffle(out)
    return out


def class_lists(labels: torch.Tensor) -> tuple[list[int], dict[int, list[int]]]:
    """The classes in the order of their first image, and each class's image indices in split order."""
    members: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        members.setdefault(int(label), []).append(i)
    return list(members), members


@register_sampler("class-balanced", lambda n, batch_size: n // batch_size * batch_size,
                  "n // batch batches of batch / samples_per_class classes x samples_per_class images (DA-VPT)")
def class_balanced(labels: torch.Tensor, seed: int, epoch: int, batch_size: int, samples_per_class: int) -> torch.Tensor:
    rng = random.Random(seed * ORDER_SEED_FACTOR + epoch)
    classes, members = class_lists(labels)
    out: list[int] = []
    for _ in range(len(labels) // batch_size):
        for c in smart_sample(rng, classes, batch_size // samples_per_class):
            out.extend(smart_sample(rng, members[c], samples_per_class))
    return torch.tensor(out, dtype=torch.long)


def sampler_order(name: str, labels: torch.Tensor, seed: int, epoch: int, batch_size: int,
                  samples_per_class: int) -> torch.Tensor:
    """The order of ``epoch`` under sampler ``name`` (its length is ``SAMPLERS.get(name).length(n, batch_size)``)."""
    return SAMPLERS.get(name).order(labels, seed, epoch, batch_size, samples_per_class)
