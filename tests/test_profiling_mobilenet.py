"""Tests for sumtune.profiling.mobilenet: the MobileNet study pipeline (stages, CIFAR-10 loading, normalization),
run with a small stand-in conv net."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sumtune.errors import SumtuneError
from sumtune.profiling import ProfileArgs, run_mobilenet_study
from sumtune.profiling import mobilenet, trace_analysis


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def test_stages_are_cumulative():
    stages = mobilenet.stage_configs()
    assert [s.name for s in stages] == list(mobilenet.STAGES)
    last = stages[-1]
    assert (last.batch_size, last.amp, last.gpu_normalize, last.num_workers, last.pin_memory) == (
        128, True, True, 2, True)
    assert stages[0].batch_size == 32 and not stages[0].amp
    for before, after in zip(stages, stages[1:]):  # each stage changes exactly one thing
        diff = [f for f in ("batch_size", "amp", "gpu_normalize", "num_workers", "pin_memory")
                if getattr(before, f) != getattr(after, f)]
        assert len(diff) == 1
    with pytest.raises(SumtuneError):
        mobilenet.select_stages(["nope"])


def test_synthetic_images_are_reproducible():
    a, la = mobilenet.synthesize_cifar10(16, seed=0)
    b, lb = mobilenet.synthesize_cifar10(16, seed=0)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and la.max() < 10


def test_load_local_cifar10_copy(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [0, 1, 2, 3, 4]}, f)
    images, labels = mobilenet.load_cifar10(tmp_path, allow_pickle=True)  # the Python version is pickle
    assert images.shape == (5, 32, 32, 3) and list(labels) == [0, 1, 2, 3, 4]
    # CIFAR rows are channel-major: the red plane is the first 1024 bytes
    assert np.array_equal(images[0, :, :, 0].reshape(-1), rows[0, :1024])
    with pytest.raises(SumtuneError):
        mobilenet.load_cifar10(tmp_path / "cifar-10-batches-py" / "nothing")


def test_cifar10_binary_version_reads_without_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    labels_in = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    for name, part in (("data_batch_1.bin", slice(0, 3)), ("data_batch_2.bin", slice(3, 5))):
        np.concatenate([labels_in[part, None], rows[part]], axis=1).tofile(folder / name)
    (folder / "test_batch.bin").write_bytes(b"\0" * 3073)  # not a training batch
    images, labels = mobilenet.load_cifar10(tmp_path)
    assert images.shape == (5, 32, 32, 3) and list(labels) == [9, 0, 3, 3, 7]
    assert np.array_equal(images[4, :, :, 2].reshape(-1), rows[4, 2048:])  # blue plane: the last 1024 bytes
    (folder / "data_batch_2.bin").write_bytes((folder / "data_batch_2.bin").read_bytes()[:-10])
    with pytest.raises(SumtuneError, match=r"data_batch_2.bin' is damaged: 6136 bytes is not a whole number"):
        mobilenet.load_cifar10(tmp_path)


class _LeavesAMark:
    """Unpickling this runs code: it creates a marker file (what an attacker's pickle would do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",))


def test_cifar10_pickle_is_never_unpickled_without_allow_pickle(tmp_path, one_thread):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "pickle_ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps(_LeavesAMark(marker)))
    args = ProfileArgs(workload="mobilenet-cifar10", quick=True, image_size=32, cifar10_dir=str(tmp_path / "cifar"),
                       stages=["base"], profile_memory=False, record_shapes=False)
    with pytest.raises(SumtuneError, match="pickle files .* can run code when loaded; .* --allow-pickle"):
        run_mobilenet_study(args, tmp_path / "out", device="cpu", model_fn=stand_in_net, echo=None)
    with pytest.raises(SumtuneError, match="--allow-pickle"):
        mobilenet.load_cifar10(tmp_path / "cifar")
    assert not marker.exists()
    with pytest.raises(Exception):  # allowed: it is unpickled (and, being no CIFAR batch, then fails)
        mobilenet.load_cifar10(tmp_path / "cifar", allow_pickle=True)
    assert marker.read_text() == "pickle ran"


def test_host_and_device_normalization_agree():
    images, labels = mobilenet.synthesize_cifar10(4)
    host = mobilenet.CifarLikeDataset(images, labels, image_size=48, normalize_on_host=True)
    raw = mobilenet.CifarLikeDataset(images, labels, image_size=48, normalize_on_host=False)
    x_host, y = host[1]
    x_raw, _ = raw[1]
    assert x_host.shape == (3, 48, 48) and x_host.dtype == torch.float32 and y == labels[1]
    assert x_raw.dtype == torch.uint8
    batch = torch.stack([raw[i][0] for i in range(4)])
    assert torch.allclose(mobilenet.to_float_normalized(batch)[1], x_host, atol=1e-6)
    assert len(mobilenet.CifarLikeDataset(images, labels, length=10)) == 10  # cycles past 4 images


@pytest.mark.gpu  # torchvision does not install beside the CPU torch build of CI; the GPU machine has it
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed (it is on the GPU machine)")
def test_transform_matches_torchvision():
    from torchvision import transforms

    images, labels = mobilenet.synthesize_cifar10(2)
    ours = mobilenet.CifarLikeDataset(images, labels, image_size=224)[0][0]
    tv = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize(mobilenet.CIFAR10_MEAN, mobilenet.CIFAR10_STD)])
    from PIL import Image

    assert torch.allclose(ours, tv(Image.fromarray(images[0])), atol=1e-5)


def stand_in_net():
    return torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))


def test_mobilenet_study_pipeline_with_stand_in_net(tmp_path, one_thread):
    args = ProfileArgs(workload="mobilenet-cifar10", quick=True, image_size=32, profile_memory=False,
                       record_shapes=False)
    lines = []
    result = run_mobilenet_study(args, tmp_path, device="cpu", model_fn=stand_in_net, echo=lines.append)
    rows = result["stages"]
    assert [r["stage"] for r in rows] == list(mobilenet.STAGES)
    assert [r["batch_size"] for r in rows] == [32, 32, 128, 128, 128, 128]
    assert rows[0]["vs_base_pct"] == pytest.approx(100.0)
    for row in rows:
        assert row["step_ms"] > 0 and row["samples_per_s"] == pytest.approx(
            1e3 * row["batch_size"] / row["step_ms"], rel=1e-6)
        assert row["published"] == mobilenet.PUBLISHED[row["stage"]]
        stage_dir = tmp_path / row["stage"]
        assert trace_analysis.find_trace_files(stage_dir) and (stage_dir / "summary.json").is_file()
        assert abs(sum(row["breakdown_pct"].values()) - 100.0) < 5.0
    table = lines[-1]
    assert "117.1" in table and "1381.6" in table and "workers2" in table
    json.dumps(result)  # the caller saves it as JSON


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_mobilenet_without_torchvision_is_a_user_error(tmp_path):
    with pytest.raises(SumtuneError, match="torchvision"):
        run_mobilenet_study(ProfileArgs(workload="mobilenet-cifar10", quick=True), tmp_path, echo=None)
    assert not any(tmp_path.iterdir())  # failed before doing any work


@pytest.mark.gpu  # torchvision does not install beside the CPU torch build of CI; the GPU machine has it
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed (it is on the GPU machine)")
def test_mobilenet_workload_with_torchvision(tmp_path):
    args = ProfileArgs(workload="mobilenet-cifar10", quick=True, image_size=64, stages=["base"], profile_memory=False)
    result = run_mobilenet_study(args, tmp_path, echo=None)
    assert result["stages"][0]["step_ms"] > 0
