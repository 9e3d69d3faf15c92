"""Folders over the memory bound are read from disk: ``ImageFiles`` and the tf.data input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import cnnforge
from cnnforge import CnnforgeWarning, Preprocessing
from cnnforge.data.stream import MEMORY_ENV, ImageFiles

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from test_agreement import tinted_folder  # noqa: E402

WANTED = Preprocessing(size=(20, 24), policy="crop")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinted_folder(tmp_path_factory.mktemp("stream") / "photos")


def streamed(folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(MEMORY_ENV, "0")
    with pytest.warns(CnnforgeWarning, match="read from disk every epoch"):
        return cnnforge.load_dataset(f"dir:{folder}", preprocessing=WANTED)


def test_over_the_bound_the_splits_are_files_with_the_same_pixels(folder, monkeypatch):
    data = streamed(folder, monkeypatch)
    monkeypatch.setenv(MEMORY_ENV, "1024")
    in_memory = cnnforge.load_dataset(f"dir:{folder}", preprocessing=WANTED)
    for split in ("x_train", "x_val", "x_test"):
        files, array = getattr(data, split), getattr(in_memory, split)
        assert isinstance(files, ImageFiles) and files.shape == array.shape
        np.testing.assert_array_equal(np.asarray(files), array)
    np.testing.assert_array_equal(data.y_train, in_memory.y_train)
    both = np.concatenate([data.x_train, data.x_val])  # final training: still files
    assert isinstance(both, ImageFiles) and len(both) == len(data.x_train) + len(data.x_val)
    assert isinstance(data.x_train[np.array([2, 0])], ImageFiles)
    np.testing.assert_array_equal(data.x_test[1:3], in_memory.x_test[1:3])
    np.testing.assert_array_equal(data.x_test[4], in_memory.x_test[4])


def test_the_training_input_decodes_every_file_once_an_epoch(folder, monkeypatch):
    from cnnforge.modeling import training

    data = streamed(folder, monkeypatch)
    recipe = training.Recipe()  # no augmentation: the pixels must come through unchanged
    batches = training.training_data(
        data.x_train, data.y_train, recipe, num_classes=2, batch_size=8, seed=0
    )
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in batches], strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (len(data.x_train), 20, 24, 3)
    # shuffled, but the same images with their labels
    expected = {
        (int(y), np.asarray(x).tobytes())
        for x, y in zip(np.asarray(data.x_train), data.y_train, strict=True)
    }
    got = {
        (int(np.argmax(y)), x.astype(np.uint8).tobytes())
        for x, y in zip(images, labels, strict=True)
    }
    assert got == expected


@pytest.mark.slow
def test_a_run_over_a_streamed_folder_deploys_what_it_trained_on(folder, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from cnnforge.cli import cli

    monkeypatch.setenv(MEMORY_ENV, "0")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["run", "--data", f"dir:{folder}", "--image-size", "20x24", "--resize", "crop"]
        + ["--max-trials", "1", "--epochs", "2", "--run-dir", str(run_dir)],
    )
    assert result.exit_code == 0, result.output
    assert "read from disk every epoch" in result.output
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    classifier = cnnforge.Classifier(run_dir / "model.onnx")
    files = sorted((folder / "test").glob("*/*"))
    labels = [p.labels[0] for p in classifier.predict(files, top_k=1)]
    accuracy = np.mean([label == f.parent.name for label, f in zip(labels, files, strict=True)])
    assert accuracy == pytest.approx(evaluation["accuracy"])


@pytest.mark.slow  # tf.data and three epochs of 552 images in workers: about 12 s
def test_one_decoding_pool_per_reader_across_epochs_not_forked(tmp_path, monkeypatch):
    """The streamed training input decodes in worker processes started once for the reader
    (not a new pool every epoch) and not forked from this threaded process."""
    from PIL import Image

    from cnnforge.data import decoding

    for i in range(2 * decoding.CHUNK + 40):  # over two chunks: decoded in worker processes
        path = tmp_path / "photos" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (6, 5), i % 256).save(path)
    monkeypatch.setenv(decoding.WORKERS_ENV, "2")
    monkeypatch.setenv("CNNFORGE_DATA_DISK_CACHE", "0")  # every epoch decodes
    pools: list[str] = []

    class Counted(decoding.ProcessPoolExecutor):
        def __init__(self, *args, mp_context=None, **kwargs):
            pools.append(mp_context.get_start_method())
            super().__init__(*args, mp_context=mp_context, **kwargs)

    monkeypatch.setattr(decoding, "ProcessPoolExecutor", Counted)
    paths = sorted((tmp_path / "photos").rglob("*.png"))
    files = ImageFiles(paths, Preprocessing(size=(5, 6), color_mode="L"))
    labels = np.arange(len(paths))
    dataset = files.tf_dataset(labels, shuffle_seed=0)
    epochs = [np.array([int(y) for _, y in dataset]) for _ in range(3)]
    assert (
        all(sorted(e) == labels.tolist() for e in epochs)
        and len({e.tobytes() for e in epochs}) == 3
    )
    both = np.concatenate([files[np.arange(10)], files[np.arange(10, len(files))]])
    np.testing.assert_array_equal(
        np.asarray(both)[:, 0, 0, 0], [Image.open(p).getpixel((0, 0)) for p in paths]
    )
    assert len(pools) == 1 and pools[0] != "fork", pools
    files.close()


def _mounts(tmp_path: Path, types: dict[str, str]) -> Path:
    """A fake /proc/mounts: ``/`` on ext4, and each folder of ``types`` on its file system."""
    space = "\\040"  # how /proc/mounts writes a space
    lines = ["/dev/sda1 / ext4 rw 0 0"] + [
        f"{fs} {str(folder).replace(' ', space)} {fs} rw 0 0" for folder, fs in types.items()
    ]
    path = tmp_path / "mounts"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("ram", "chosen"),
    [
        ((), "xdg"),  # ~/.cache (XDG) on disk: there
        (("xdg",), "tmp"),  # the XDG cache is tmpfs, the temp folder disk
        (("xdg", "tmp"), None),  # both memory: no disk cache, and why
    ],
)
def test_the_pixel_cache_goes_to_disk_not_tmpfs(tmp_path, monkeypatch, ram, chosen):
    import tempfile

    from cnnforge.data import stream

    places = {name: tmp_path / name for name in ("xdg", "tmp")}
    for folder in places.values():
        folder.mkdir()
    monkeypatch.delenv(stream.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(places["xdg"]))
    monkeypatch.setattr(tempfile, "tempdir", str(places["tmp"]))
    mounts = _mounts(tmp_path, {places[n]: "tmpfs" for n in ram})
    place = stream.cache_place(mounts)
    if chosen is None:
        assert place.folder is None
        assert "tmpfs" in place.describe() and stream.CACHE_DIR_ENV in place.describe()
    else:
        expected = places[chosen] / "cnnforge" if chosen == "xdg" else places[chosen]
        assert place.folder == expected and str(expected) in place.describe()


def test_cache_dir_is_the_users_choice_and_tmpfs_there_is_named(tmp_path, monkeypatch):
    from cnnforge.data import stream

    monkeypatch.setenv(stream.CACHE_DIR_ENV, str(tmp_path / "mine"))
    place = stream.cache_place(_mounts(tmp_path, {}))
    assert place.folder == tmp_path / "mine" and "memory" not in place.describe()
    place = stream.cache_place(_mounts(tmp_path, {tmp_path: "tmpfs"}))
    assert place.folder == tmp_path / "mine" and "tmpfs: memory, not disk" in place.describe()


def test_streamed_files_write_their_cache_where_cache_dir_says(tmp_path, monkeypatch):
    """``cnnforge --cache-dir DIR data`` prints where the cache goes; the pixel cache file of a
    streamed split is made there."""
    from click.testing import CliRunner

    from cnnforge.cli import cli
    from cnnforge.data import stream

    folder = tinted_folder(tmp_path / "photos")
    monkeypatch.delenv(stream.CACHE_DIR_ENV, raising=False)
    result = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "cache"), "data", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"disk cache of streamed images: {tmp_path / 'cache'}" in result.output
    monkeypatch.setenv(stream.CACHE_DIR_ENV, str(tmp_path / "cache"))
    files = ImageFiles(sorted(folder.rglob("*.png"))[:3], WANTED)
    cache = files._pixel_cache()
    assert cache is not None
    assert os.readlink(f"/proc/self/fd/{cache.file.fileno()}").startswith(str(tmp_path / "cache"))
