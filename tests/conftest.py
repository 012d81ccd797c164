"""Shared test set-up: offline hub, small thread count, a session-wide demo data root."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # otherwise timm retries the hub for ~60 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PEFTBENCH_CACHE" not in os.environ:  # decoded images and verify stamps: never the user's home cache
    import tempfile

    os.environ["PEFTBENCH_CACHE"] = tempfile.mkdtemp(prefix="peftbench-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models: one intra-op thread is as fast as two, and much faster on a shared, loaded machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A data root holding the demo tasks (materialised on first use by the tasks themselves)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_backbone():
    """A small random timm ViT (fast enough for gradient and equality tests)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=0, global_pool="token")
