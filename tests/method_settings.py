"""The required settings table of the method conformance suite (tests/test_conformance.py).

One row per registered built-in method, keyed by its name: what the shared tests need to test it cheaply.
A registered method without a row fails the suite with a message saying what to add (composer's
``algorithm_settings``, timm's ``list_models`` tests, peft's ``PeftCommonTester`` table). A new method of a
wave joins by adding one row here.

Row fields (:class:`MethodSettings`):

* ``options``: ``--set`` values that make a cheap model on the tiny test backbone (prompt lengths of 2...).
* ``vit_b_head``: the head's parameters there (768·C + C unless the method widens the head's input, e.g. VQT).
* ``vit_b``: ``(options, trainable parameters without the head)`` on ViT-B/16 with C = 100, built on the meta
  device: the documented formula's value (docs/methods/README.md §4 and the method's page); ``None`` with
  ``counts_elsewhere`` naming the test that checks a count that depends on a selection.
* ``variants``: the cheaper inference models the method's model offers (``TunedViT.inference_variants``:
  ``merged``, a plain timm ViT for ``peftbench export``; ``folded`` / ``compacted`` prompt models); the suite
  checks that the model offers exactly these and that each gives the model's logits.
* ``family_variants``: family -> the inference models on that family, where they differ from ``variants`` (the
  prompt folding exists for the ViT only).
* ``tol``: the relative tolerance of the fused-equals-separate and merged-equals-unmerged checks (float64).
* ``doc``: its page in docs/methods/ (default: the page its description names).
* ``skip``: check name -> the reason it does not apply to this method (a known exception, stated).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSettings:
    options: dict = field(default_factory=dict)
    vit_b: tuple[dict, int] | None = None
    vit_b_head: int = 769 * 100  # the head's parameters on ViT-B/16 with C = 100 (a method may widen its input)
    counts_elsewhere: str = ""
    variants: tuple[str, ...] = ()
    family_variants: dict = field(default_factory=dict)
    tol: float = 1e-9
    doc: str = ""
    skip: dict = field(default_factory=dict)


PROMPTS = {"prompt_tokens": "2"}
E2VPT = {"prompt_tokens": "2", "kv_tokens": "2"}
PEFT_DOC = "docs/methods/peft_tuners.md"
MERGED = ("merged",)
FOLDED = ("folded",)

SETTINGS: dict[str, MethodSettings] = {
    # heads and whole-backbone methods (docs/methods/README.md §4)
    "linear": MethodSettings(vit_b=({}, 0), variants=MERGED),
    "mlp-3": MethodSettings(vit_b=({}, 1_184_256)),
    "full": MethodSettings(vit_b=({}, 85_798_656), variants=MERGED),
    "partial-1": MethodSettings(vit_b=({}, 7_089_408), variants=MERGED),
    "bitfit": MethodSettings(vit_b=({}, 102_912), variants=MERGED),
    "ln-tune": MethodSettings(vit_b=({}, 38_400), variants=MERGED),
    "difffit": MethodSettings(vit_b=({}, 140_544), variants=MERGED),
    "ssf": MethodSettings(vit_b=({}, 205_824), variants=MERGED),
    # prompts
    "vpt-shallow": MethodSettings(options=PROMPTS, vit_b=({"prompt_tokens": "100"}, 768 * 100)),
    "vpt-deep": MethodSettings(options=PROMPTS, vit_b=({"prompt_tokens": "10"}, 9_216 * 10), variants=FOLDED,
                               family_variants={"swin": ()}),
    "vfpt": MethodSettings(options={"prompt_tokens": "4", "fourier_percentage": "0.5"},
                           vit_b=({"prompt_tokens": "10", "fourier_percentage": "0.5"}, 9_216 * 10), variants=FOLDED),
    "e2vpt": MethodSettings(options=E2VPT, vit_b=({"prompt_tokens": "10", "kv_tokens": "5"}, 9_216 * 10 + 9_216 * 5),
                            variants=FOLDED, family_variants={"swin": ()}),
    "e2vpt-prune": MethodSettings(options={**E2VPT, "prune_tokens": "1", "prune_segments": "8"},
                                  counts_elsewhere="tests/test_e2vpt_prune.py (the pruned count of docs/methods/e2vpt.md §5)",
                                  variants=("folded", "compacted")),
    # adapters (docs/methods/adapter.md, adapter_plus.md, adaptformer.md, convpass.md, repadapter.md, fact.md)
    "adapter": MethodSettings(vit_b=({"reduction": "8"}, 1_779_840)),
    "adapter-noah": MethodSettings(vit_b=({}, 156_768)),
    "adapter-plus": MethodSettings(vit_b=({}, 165_984)),
    "adapter-houlsby": MethodSettings(vit_b=({}, 351_936)),
    "adaptformer": MethodSettings(vit_b=({}, 156_768)),
    "convpass": MethodSettings(vit_b=({}, 327_552)),
    "repadapter": MethodSettings(vit_b=({}, 239_808), variants=MERGED),
    "hydra": MethodSettings(vit_b=({}, 239_712), variants=MERGED),
    "dtl": MethodSettings(vit_b=({}, 36_864)),
    "dtl-plus": MethodSettings(vit_b=({"kernel": "4"}, 49_152)),
    "sct": MethodSettings(vit_b=({}, 111_744)),
    "lst": MethodSettings(vit_b=({}, 1_819_497)),
    "restuning-bypass": MethodSettings(vit_b=({}, 1_198_848)),
    "mosa": MethodSettings(vit_b=({}, 350_400)),
    # 10 guided prompts in the last block, 20 in the others, the CLS token and 8 bias / LayerNorm vectors per block
    "da-vpt": MethodSettings(options={"proxies": "2", "prompts": "2"}, vit_b=({}, 233_472)),
    # an explicit configuration on the 3-block test ViT (the default 'search' runs the supernet and the evolution:
    # tests/test_glora_search.py); on ViT-B the supernet's tensors
    "glora-search": MethodSettings(options={"paths": ",".join(["LvLcv", "cnvnc", "nLnvv", "vcLcn"] * 3)},
                                   vit_b=({}, 1_603_776), variants=MERGED),
    "cvpt": MethodSettings(options={"prompt_tokens": "2"}, vit_b=({"prompt_tokens": "10"}, 12 * 10 * 768)),
    # 10 x 768 + 11 x (LayerNorm + 2 x 2 kernel + 169 positions -> 10 tokens) + the shared 768-8-768 MLP
    "vapt": MethodSettings(options={"tokens": "2", "hidden": "4"}, vit_b=({}, 55_608)),
    # the side network (stems, 12 side blocks, norms), meta tokens, bridges and the ViT's 24 LayerNorms; its head reads the
    # last stage's 72 channels (tests/test_hst.py has the formula)
    "hst": MethodSettings(vit_b=({}, 764_840), vit_b_head=73 * 100),
    # a fixed subnet with absent modules (0) in places; ViT-B/16: NOAH's released CIFAR-100 subnet (tests/test_noah.py)
    "noah": MethodSettings(options={"prompt_dims": "2,0,3", "lora_dims": "1,2,0", "adapter_dims": "0,3,1"},
                           vit_b=({"prompt_dims": "10,5,10,1,5,1,10,1,10,5,1,10", "lora_dims": "10,1,5,5,1,10,1,1,1,10,1,1",
                                   "adapter_dims": "5,10,10,10,5,1,1,1,10,10,10,1"}, 320_330)),
    "vqt": MethodSettings(options={"tokens": "2"}, vit_b=({}, 92_160), vit_b_head=(768 * (1 + 12 * 10) + 1) * 100),
    # (+ the CLS token, which SNELL trains; sparsity 0.5 so that the conformance suite covers the competition)
    "snell": MethodSettings(options={"rank": "4", "sparsity": "0.5"}, vit_b=({"rank": "32"}, 5_309_184),
                            variants=MERGED, tol=1e-8),
    "snella": MethodSettings(options={"rank": "4", "variant": "snella", "target_sparsity": "0.5"},
                             vit_b=({"rank": "32"}, 5_309_400), variants=MERGED, tol=1e-8),
    "fact-tt": MethodSettings(vit_b=({"rank": "8"}, 21_504), variants=MERGED),
    "fact-tk": MethodSettings(vit_b=({"rank": "32"}, 86_528), variants=MERGED),
    # selection methods: their counts depend on what their selection stage picks
    "gps": MethodSettings(options={"K": "1", "drop_path": "0"}, vit_b=({"K": "1", "drop_path": "0"}, 83_712 * 2),
                          variants=MERGED),
    "spt-lora": MethodSettings(options={"budget": "0.4", "sensitivity_batches": "1", "sensitivity_batch_size": "16"},
                               counts_elsewhere="tests/test_spt.py::test_released_masks_reproduce_their_budgets_on_vit_b16",
                               variants=MERGED),
    "spt-adapter": MethodSettings(options={"budget": "0.4", "sensitivity_batches": "1", "sensitivity_batch_size": "16"},
                                  counts_elsewhere="tests/test_spt.py::test_released_masks_reproduce_their_budgets_on_vit_b16"),
    # HF peft tuners (docs/methods/peft_tuners.md, the "trainable without head, ViT-B/16 defaults" column)
    "lora": MethodSettings(vit_b=({}, 294_912), variants=MERGED),
    "dora": MethodSettings(vit_b=({}, 322_560), variants=MERGED, doc=PEFT_DOC),
    "loha": MethodSettings(vit_b=({}, 589_824), variants=MERGED, doc=PEFT_DOC),
    "lokr": MethodSettings(vit_b=({}, 21_504), variants=MERGED, doc=PEFT_DOC),
    "vera": MethodSettings(vit_b=({}, 30_720), variants=MERGED, doc=PEFT_DOC),
    "ia3": MethodSettings(vit_b=({}, 64_512), variants=MERGED, doc=PEFT_DOC),
    "fourierft": MethodSettings(vit_b=({}, 12_000), variants=MERGED, doc=PEFT_DOC),
    "boft": MethodSettings(vit_b=({}, 64_512), variants=MERGED, doc=PEFT_DOC),
    "oft": MethodSettings(vit_b=({}, 437_760), variants=MERGED, doc=PEFT_DOC),
    "hra": MethodSettings(vit_b=({}, 73_728), variants=MERGED, doc=PEFT_DOC),
    "randlora": MethodSettings(vit_b=({}, 230_400), variants=MERGED, doc=PEFT_DOC),
    "shira": MethodSettings(vit_b=({}, 294_912), variants=MERGED, doc=PEFT_DOC),
    "vblora": MethodSettings(options={"vector_length": "16", "num_vectors": "32"}, vit_b=({}, 212_992),
                             variants=MERGED, doc=PEFT_DOC),
    "gralora": MethodSettings(vit_b=({}, 294_912), variants=MERGED, doc=PEFT_DOC),
    "hira": MethodSettings(vit_b=({}, 294_912), variants=MERGED, doc=PEFT_DOC),
    "delora": MethodSettings(vit_b=({}, 294_924), variants=MERGED, doc=PEFT_DOC),
    "road": MethodSettings(options={"group_size": "16"}, vit_b=({}, 27_648), variants=MERGED, doc=PEFT_DOC),
    "miss": MethodSettings(options={"rank": "8"}, vit_b=({}, 1_769_472), variants=MERGED, doc=PEFT_DOC),
    "adalora": MethodSettings(options={"init_r": "4", "target_r": "2"}, vit_b=({}, 442_512), variants=MERGED,
                              doc=PEFT_DOC),
    "glora": MethodSettings(vit_b=({}, 663_672), variants=MERGED, doc=PEFT_DOC),
    "waveft": MethodSettings(vit_b=({}, 31_104), variants=MERGED, doc=PEFT_DOC),
    "lily": MethodSettings(vit_b=({}, 443_136), doc=PEFT_DOC),  # its router mixes the B experts per input: no merge
    "psoft": MethodSettings(options={"rank": "8"}, vit_b=({}, 6_720), variants=MERGED, doc=PEFT_DOC),
    "pvera": MethodSettings(options={"rank": "16"}, vit_b=({}, 33_792), variants=MERGED, doc=PEFT_DOC),
    "tinylora": MethodSettings(vit_b=({}, 768), variants=MERGED, doc=PEFT_DOC),
    "unilora": MethodSettings(vit_b=({}, 256), variants=MERGED, doc=PEFT_DOC),
    # peft computes DEFT's projection and merge in float32 whatever the model's dtype (peft/tuners/deft/layer.py:195-222)
    "deft": MethodSettings(vit_b=({}, 294_912), variants=MERGED, doc=PEFT_DOC, tol=1e-6),
    "beft": MethodSettings(vit_b=({}, 27_648), variants=MERGED, doc=PEFT_DOC),
    "frod": MethodSettings(vit_b=({}, 79_992), variants=MERGED, doc=PEFT_DOC),
    "peanut": MethodSettings(options={"rank": "4"}, vit_b=({}, 1_769_472), variants=MERGED, doc=PEFT_DOC),
    "supertuning": MethodSettings(vit_b=({}, 212_328), variants=MERGED, doc=PEFT_DOC),
    # peft computes C3A's circulant products in float32 whatever the model's dtype (peft/tuners/c3a/layer.py:57,193):
    # merged and unmerged agree to float32 precision only
    "c3a": MethodSettings(options={"block_size": "16"}, vit_b=({}, 82_944), variants=MERGED, doc=PEFT_DOC, tol=1e-6),
}
