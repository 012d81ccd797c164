"""The decoded-image cache: built once, reused across runs (no decoding), rebuilt when the split lists or
the size change, safe under concurrent builders; and `peftbench data bench`."""
import threading

import numpy as np
import pytest
import torch
from fixtures_data import write_vtab_task

import peftbench.data.images as images
from peftbench.cli import main
from peftbench.data import cache, loader, splits, transforms
from peftbench.data.splits import fingerprint
from peftbench.tasks import get_task


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    loader.clear_cache()
    yield
    loader.clear_cache()


@pytest.fixture
def root(tmp_path):
    write_vtab_task(tmp_path / "data", "eurosat")
    return tmp_path / "data"


def cached_files(tmp_path):
    return sorted((tmp_path / "cache" / "decoded").glob("*.u8"))


def no_decoding(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("an image was decoded although the cache holds it")

    monkeypatch.setattr(images, "decode", fail)


def test_second_load_reads_the_cache_without_decoding(root, tmp_path, monkeypatch):
    task = get_task("eurosat")
    first = loader.load_split(task, root, "test", 32).images.clone()
    (f,) = cached_files(tmp_path)
    assert f.name.startswith(f"eurosat-test-{fingerprint(task, root)}-r32-")
    assert cache.read_header(f)["shape"] == [12, 3, 32, 32]
    loader.clear_cache()  # a new run / process
    no_decoding(monkeypatch)
    again = loader.load_split(task, root, "test", 32)
    assert torch.equal(again.images, first)
    assert again.labels.tolist() == [i % 10 for i in range(12)]
    # and the cached pixels are what decoding gives
    monkeypatch.undo()
    s = splits.read_split(task, root, "test")
    assert np.array_equal(first[3].permute(1, 2, 0).numpy(), images.decode(s.paths[3], 32))


def test_rebuilt_when_split_list_or_size_changes(root, tmp_path):
    task = get_task("eurosat")
    loader.load_split(task, root, "test", 32)
    loader.load_split(task, root, "test", 16)
    assert len(cached_files(tmp_path)) == 2
    f = root / "vtab-1k" / "eurosat" / "test.txt"
    lines = f.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    f.write_text("\n".join(lines) + "\n")
    loader.clear_cache()
    x = loader.load_split(task, root, "test", 32)
    assert len(cached_files(tmp_path)) == 3
    assert x.labels.tolist()[:2] == [1, 0]


def test_a_damaged_cache_file_is_rebuilt(root, tmp_path):
    task = get_task("eurosat")
    ref = loader.load_split(task, root, "val200", 32).images.clone()
    (f,) = cached_files(tmp_path)
    with open(f, "r+b") as fh:
        fh.truncate(cache.HEADER_BYTES + 100)
    loader.clear_cache()
    assert torch.equal(loader.load_split(task, root, "val200", 32).images, ref)


def test_concurrent_builders_agree(root, tmp_path):
    task = get_task("eurosat")
    s = splits.read_split(task, root, "train800")
    geo = transforms.geometry(task, "train800", 32)
    out, errors = [], []

    def build():
        try:
            out.append(cache.decoded_images(task, root, s, geo, log=False).clone())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 4 and all(torch.equal(o, out[0]) for o in out)
    assert len(cached_files(tmp_path)) == 1
    assert not list((tmp_path / "cache" / "decoded").glob(".*.tmp"))


def test_cache_off(root, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", "off")
    x = loader.load_split(get_task("eurosat"), root, "test", 32)
    assert x.images.shape == (12, 3, 32, 32) and not (tmp_path / "cache").exists()


def test_bench_command_reports_cold_and_warm(root, capsys):
    assert main(["data", "bench", "--suite", "vtab", "--tasks", "eurosat", "--data-root", str(root),
                 "--size", "32"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("eurosat"))
    cold, warm, torch_index = [float(x) for x in line.replace("img/s", "").split()[-3:]]
    assert warm > cold > 0 and torch_index > 0
