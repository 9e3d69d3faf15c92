"""Dataset sources: the bundled subset, local copies of the keras datasets, folders, .npz."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnforge
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import parse_source, stratified_split
from cnnforge.data.readers import read_cifar, read_idx_folder

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_bundled_subset_is_stratified_real_fashion_mnist():
    data = cnnforge.load_dataset("fashion_mnist_small", val_fraction=0.1, seed=0)
    assert data.spec.input_shape == (28, 28, 1)
    assert data.spec.class_names[0] == "T-shirt/top" and data.spec.num_classes == 10
    assert len(data.x_train) + len(data.x_val) == 8000 and len(data.x_test) == 2000
    assert np.bincount(data.y_test).tolist() == [200] * 10
    assert np.bincount(data.y_val).tolist() == [80] * 10
    assert data.x_train.dtype == np.uint8 and data.x_train.max() > 200


def test_validation_split_is_seeded_and_disjoint():
    labels = np.repeat(np.arange(3), 20)
    a_train, a_val = stratified_split(labels, 0.25, seed=1)
    b_train, b_val = stratified_split(labels, 0.25, seed=1)
    c_train, c_val = stratified_split(labels, 0.25, seed=2)
    assert np.array_equal(a_val, b_val) and not np.array_equal(np.sort(a_val), np.sort(c_val))
    assert set(a_train).isdisjoint(a_val) and len(a_train) + len(a_val) == 60
    assert np.bincount(labels[a_val]).tolist() == [5, 5, 5]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("fashion_mnist", ("fashion_mnist", None)),
        ("fashion_mnist:/data/fm", ("fashion_mnist", "/data/fm")),
        ("dir:photos", ("dir", "photos")),
        ("some/file.npz", ("npz", "some/file.npz")),
        ("./photos", ("dir", "./photos")),
    ],
)
def test_parse_source(source, expected):
    assert parse_source(source) == expected


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder_reader_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 2
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    (x_train, y_train), (x_test, _) = read_idx_folder(tmp_path)
    assert np.array_equal(x_train, images) and np.array_equal(y_train, labels)
    assert x_test.shape == (6, 28, 28)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 4, 4)))
    data = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(CnnforgeError, match="truncated"):
        read_idx_folder(tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)",
)
def test_fashion_mnist_reads_the_debian_idx_files():
    data = cnnforge.load_dataset(f"fashion_mnist:{FASHION_MNIST_DIR}")
    assert len(data.x_train) + len(data.x_val) == 60000 and len(data.x_test) == 10000
    assert data.spec.class_names[-1] == "Ankle boot"


def _cifar10_tarball(path: Path, replace: dict[str, bytes] | None = None) -> None:
    """A small CIFAR-10 python download (tarball and folder); ``replace`` swaps files' bytes."""
    rng = np.random.default_rng(0)
    folder = path.parent / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i % 10] * 4}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 2]})
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    for name, blob in (replace or {}).items():
        (folder / name).write_bytes(blob)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def test_cifar10_reads_the_python_tarball_and_its_folder(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_tarball(tarball)
    for source in (tarball, tmp_path / "cifar-10-batches-py"):
        data = cnnforge.load_dataset(f"cifar10:{source}", val_fraction=0.25)
        assert data.spec.input_shape == (32, 32, 3)
        assert len(data.x_train) + len(data.x_val) == 20 and len(data.x_test) == 3
        assert data.spec.class_names[2] == "bird"


def test_cifar_reads_only_its_batches_not_other_members(tmp_path, monkeypatch):
    """A tarball or folder with other big files (here an 8 MB one) reads only the seven
    CIFAR-10 batches, not every member."""
    tarball = tmp_path / "cifar-10-python.tar.gz"
    folder = tmp_path / "cifar-10-batches-py"
    big = tmp_path / "extra" / "huge.bin"
    big.parent.mkdir()
    big.write_bytes(b"\0" * (8 << 20))
    _cifar10_tarball(tarball)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(big, arcname="extra/huge.bin")
        tar.add(folder, arcname=folder.name)
    (folder / "readme.html").write_bytes(b"\0" * (8 << 20))
    read: list[str] = []
    extract, read_bytes = tarfile.TarFile.extractfile, Path.read_bytes
    monkeypatch.setattr(
        tarfile.TarFile,
        "extractfile",
        lambda tar, m: read.append(Path(m.name).name) or extract(tar, m),
    )
    monkeypatch.setattr(Path, "read_bytes", lambda p: read.append(p.name) or read_bytes(p))
    seven = ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
    for source in (tarball, folder):
        read.clear()
        (x_train, _), (x_test, _), names = read_cifar(source)
        assert len(x_train) == 20 and len(x_test) == 3 and names[2] == "bird"
        assert sorted(read) == sorted(seven)


class _Call:
    """Pickles as a call of ``function(*args)``, as a hostile pickle would."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    ("function", "protocol", "refused"),
    [(os.system, 2, f"{os.system.__module__}.system"), (builtins.exec, 4, "builtins.exec")],
)
def test_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path, function, protocol, refused):
    marker = tmp_path / "MARKER"
    arg = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    hostile = pickle.dumps({"data": _Call(function, arg), "labels": [0] * 4}, protocol=protocol)
    pickle.loads(hostile)  # the pickle does run code when read naively ...
    assert marker.exists()
    marker.unlink()
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_tarball(tarball, {"data_batch_3": hostile})
    for source in (tarball, tmp_path / "cifar-10-batches-py"):
        with pytest.raises(CnnforgeError) as caught:  # ... but not through read_cifar
            read_cifar(source)
        message = str(caught.value)
        assert "\n" not in message and str(source) in message
        assert f"data_batch_3 is a pickle that calls {refused}," in message
        assert not marker.exists()


def test_cifar_batches_pickled_by_numpy_1_and_with_protocol_5_are_read(tmp_path):
    """The real CIFAR files name numpy 1's ``numpy.core.multiarray``; protocol 5 pickles
    arrays with ``_frombuffer``. Both are read, without numpy 2's deprecation warning."""
    images = np.arange(4 * 3072).reshape(4, 3072).astype(np.uint8)
    batch = {"data": images, "labels": [1, 2, 3, 4]}
    numpy_1 = pickle.dumps(batch, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert b"numpy.core.multiarray\n_reconstruct" in numpy_1
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_tarball(
        tarball, {"data_batch_1": numpy_1, "data_batch_2": pickle.dumps(batch, protocol=5)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (x_train, y_train), _, _ = read_cifar(tarball)
    expected = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(x_train[:4], expected)
    np.testing.assert_array_equal(x_train[4:8], expected)
    assert y_train[:8].tolist() == [1, 2, 3, 4] * 2


def _image_folder(
    root: Path, sizes: dict[str, tuple[int, int]], count: int = 5, mode: str = "L"
) -> None:
    rng = np.random.default_rng(0)
    for name, size in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i}.png"
            )


def test_image_folder_with_class_subfolders(tmp_path):
    _image_folder(tmp_path, {"cats": (12, 10), "dogs": (12, 10)}, count=10, mode="RGB")
    data = cnnforge.load_dataset(f"dir:{tmp_path}", val_fraction=0.2)
    assert data.spec.class_names == ("cats", "dogs")
    assert data.spec.input_shape == (10, 12, 3)
    assert len(data.x_test) == 4


def test_image_folder_errors_name_the_problem(tmp_path):
    _image_folder(tmp_path / "one", {"only": (8, 8)})
    with pytest.raises(CnnforgeError, match="1 class folder"):
        cnnforge.load_dataset(f"dir:{tmp_path / 'one'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(CnnforgeError, match="has no readable images"):
        cnnforge.load_dataset(f"dir:{tmp_path / 'empty'}")
    with pytest.raises(CnnforgeError, match="does not exist"):
        cnnforge.load_dataset(f"dir:{tmp_path / 'missing'}")
    _image_folder(tmp_path / "corrupt", {"a": (8, 8), "b": (8, 8)})
    (tmp_path / "corrupt" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(CnnforgeError, match="cannot read image .*0.png.*--strict-data"):
        cnnforge.load_dataset(f"dir:{tmp_path / 'corrupt'}", strict=True)


def test_npz_errors_name_the_problem(tmp_path):
    x, y = np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 0, 1])
    np.savez(tmp_path / "mismatch.npz", x_train=x, y_train=y[:3], x_test=x, y_test=y)
    with pytest.raises(CnnforgeError, match="4 images but 3 labels"):
        cnnforge.load_dataset(str(tmp_path / "mismatch.npz"))
    np.savez(
        tmp_path / "range.npz",
        x_train=x,
        y_train=y,
        x_test=x,
        y_test=y + 5,
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(CnnforgeError, match=r"labels range over 5..6 but there are 2 classes"):
        cnnforge.load_dataset(str(tmp_path / "range.npz"))
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=y)
    with pytest.raises(CnnforgeError, match="lacks x_test, y_test"):
        cnnforge.load_dataset(str(tmp_path / "partial.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CnnforgeError, match="not a readable .npz"):
        cnnforge.load_dataset(str(tmp_path / "junk.npz"))


def test_unknown_dataset_suggests_names():
    with pytest.raises(CnnforgeError, match="did you mean fashion_mnist"):
        cnnforge.load_dataset("fashion_mnst")
