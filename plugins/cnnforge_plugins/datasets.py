"""Built-in datasets: the bundled Fashion-MNIST subset, the keras loaders (each also reading a
local copy), image folders and .npz files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cnnforge import (
    CnnforgeError,
    Preprocessing,
    RawData,
    dataset,
    read_cifar,
    read_idx_folder,
    read_image_folder,
    read_npz,
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
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
)


def _keras_download(name: str, local_hint: str):
    """The real keras loader; offline, a clear error that says how to pass a local copy."""
    import keras

    loader = getattr(keras.datasets, name)
    try:
        return loader.load_data()
    except Exception as exc:
        raise CnnforgeError(
            f"could not download {name} ({type(exc).__name__}); pass a local copy: "
            f"--data {name}:{local_hint}"
        ) from None


def _from_idx(path: str | None, keras_name: str, names: tuple[str, ...]) -> RawData:
    if path is None:
        (x_train, y_train), (x_test, y_test) = _keras_download(keras_name, "FOLDER_WITH_IDX_FILES")
    else:
        (x_train, y_train), (x_test, y_test) = read_idx_folder(Path(path))
    return RawData(x_train, y_train, x_test, y_test, names)


@dataset("fashion_mnist_small")
def fashion_mnist_small(path: str | None) -> RawData:
    """Bundled stratified subset of Fashion-MNIST: 8000 train, 2000 test, 28x28 grayscale."""
    bundled = resources.files("cnnforge_plugins") / "_data" / "fashion_mnist_small.npz"
    with resources.as_file(bundled) as file:
        return read_npz(Path(path) if path else file)


@dataset("fashion_mnist")
def fashion_mnist(path: str | None) -> RawData:
    """Fashion-MNIST, 70000 28x28 grayscale; local: the idx folder (e.g. /usr/share/datasets/fashion-mnist)."""
    return _from_idx(path, "fashion_mnist", FASHION_MNIST_CLASSES)


@dataset("mnist")
def mnist(path: str | None) -> RawData:
    """MNIST digits, 70000 28x28 grayscale; local: the idx folder or keras' mnist.npz."""
    if path and path.endswith(".npz"):
        return read_npz(Path(path))
    return _from_idx(path, "mnist", DIGITS)


def _cifar(path: str | None, keras_name: str, default_names: tuple[str, ...] | None) -> RawData:
    if path is None:
        (x_train, y_train), (x_test, y_test) = _keras_download(keras_name, "cifar-python.tar.gz")
        names = default_names or tuple(str(i) for i in range(int(y_train.max()) + 1))
    else:
        (x_train, y_train), (x_test, y_test), names = read_cifar(Path(path))
    return RawData(x_train, y_train, x_test, y_test, tuple(names))


@dataset("cifar10")
def cifar10(path: str | None) -> RawData:
    """CIFAR-10, 60000 32x32 colour; local: cifar-10-python.tar.gz or its extracted folder."""
    return _cifar(path, "cifar10", CIFAR10_CLASSES)


@dataset("cifar100")
def cifar100(path: str | None) -> RawData:
    """CIFAR-100 (fine labels), 60000 32x32 colour; local: cifar-100-python.tar.gz or its folder."""
    return _cifar(path, "cifar100", None)


@dataset("dir")
def image_folder(
    path: str | None,
    *,
    preprocessing: Preprocessing | None = None,
    strict: bool = False,
    seed: int = 0,
) -> RawData:
    """An image folder of any sizes and modes, one subfolder per class (or train/, val/ and
    test/ each holding those)."""
    if not path:
        raise CnnforgeError("dir needs a folder: --data dir:PATH")
    return read_image_folder(Path(path), preprocessing=preprocessing, strict=strict, seed=seed)


@dataset("npz")
def npz_file(path: str | None) -> RawData:
    """An .npz file with x_train, y_train, x_test, y_test (and optionally class_names)."""
    if not path:
        raise CnnforgeError("npz needs a file: --data npz:PATH.npz")
    return read_npz(Path(path))
