"""Decoding in worker processes gives the pixels decoding in this process gives, and the
streamed input reads later epochs from its disk cache of those pixels."""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cnnforge import CnnforgeError, CnnforgeWarning, Preprocessing
from cnnforge.data import decoding
from cnnforge.data.decoding import decode_all, decode_files, open_upright
from cnnforge.data.stream import DISK_CACHE_ENV, ImageFiles

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from test_agreement import tinted_folder  # noqa: E402

WANTED = Preprocessing(size=(20, 24), policy="crop", color_mode="RGB")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tinted_folder(tmp_path_factory.mktemp("decoding") / "photos")
    return sorted(str(p) for p in root.glob("*/*/*"))


def test_worker_processes_decode_the_same_pixels_in_order(paths, tmp_path, monkeypatch):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = [*paths[:30], str(broken), *paths[30:]]
    expected, failed_here = decode_files(files, WANTED)
    monkeypatch.setattr(decoding, "CHUNK", 8)  # many chunks, so the pool is used
    monkeypatch.setenv(decoding.WORKERS_ENV, "2")
    pixels, failed = decode_all(files, WANTED)
    np.testing.assert_array_equal(pixels, expected)
    assert list(failed) == list(failed_here) == [30]
    for i in (0, 7, 8, 40):  # each is what deployment's own steps compute
        upright = ImageOps.exif_transpose(Image.open(files[i]))
        np.testing.assert_array_equal(pixels[i], WANTED.apply(upright))


def test_an_orientation_in_exif_is_still_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    buffer = io.BytesIO()
    Image.new("RGB", (30, 10), (200, 10, 10)).save(buffer, "JPEG", exif=exif)
    (tmp_path / "turned.jpg").write_bytes(buffer.getvalue())
    assert open_upright(tmp_path / "turned.jpg").size == (10, 30)


def test_later_epochs_of_the_streamed_input_come_from_the_disk_cache(paths, tmp_path, monkeypatch):
    monkeypatch.setattr(decoding, "CHUNK", 8)
    monkeypatch.setenv(DISK_CACHE_ENV, "1")
    copies = []
    for i, path in enumerate(paths[:40]):
        copies.append(tmp_path / f"{i}{Path(path).suffix}")
        shutil.copy(path, copies[-1])
    files = ImageFiles(copies, WANTED)
    labels = np.arange(len(files))
    dataset = files.tf_dataset(labels, shuffle_seed=0)
    first = [(int(y), x.numpy()) for x, y in dataset]
    for copy in copies:  # what a later epoch reads can only come from the cache now
        copy.unlink()
    second = [(int(y), x.numpy()) for x, y in dataset]
    assert [y for y, _ in first] != [y for y, _ in second]  # reshuffled
    expected, _ = decode_files(paths[:40], WANTED)
    for epoch in (first, second):
        assert sorted(y for y, _ in epoch) == list(range(40))
        for y, x in epoch:
            np.testing.assert_array_equal(x, expected[y])


def test_without_the_disk_cache_every_epoch_decodes_the_files(paths, tmp_path, monkeypatch):
    monkeypatch.setenv(DISK_CACHE_ENV, "0")
    copies = []
    for i, path in enumerate(paths[:6]):
        copies.append(tmp_path / f"{i}{Path(path).suffix}")
        shutil.copy(path, copies[-1])
    dataset = ImageFiles(copies, WANTED).tf_dataset(np.arange(6))
    assert [x.numpy().max() for x, _ in dataset] != [0] * 6
    for copy in copies:
        copy.unlink()
    with pytest.warns(CnnforgeWarning, match="fed as a black image"):
        assert [x.numpy().max() for x, _ in dataset] == [0] * 6


def _folder(root: Path, per_class: int) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8, 8), i).save(root / name / f"{i}.png")
    return root


def test_the_epoch_estimate_of_cnnforge_data_counts_the_processes_the_reader_decodes_in(
    tmp_path, monkeypatch
):
    """`cnnforge data` times its sample by the reader's own decoding function and divides by
    the processes the reader would use: a pool for a folder of many chunks, this process alone
    for a small one (whatever the CPUs)."""
    from cnnforge.data import folders, summary

    monkeypatch.setattr(decoding, "CHUNK", 8)
    monkeypatch.setenv(decoding.WORKERS_ENV, "3")
    assert summary.decode_all is folders.decode_all  # the reader's path, timed
    big = summary.summarize(f"dir:{_folder(tmp_path / 'big', 20)}")
    assert big.read_workers == 3 and big.epoch_read_s > 0
    assert big.epoch_read_s == pytest.approx(40 / big.read_images_per_s)
    small = summary.summarize(f"dir:{_folder(tmp_path / 'small', 4)}")  # one chunk: no pool
    assert small.read_workers == 1 and small.epoch_read_s > 0
    assert small.epoch_read_s == pytest.approx(8 / small.read_images_per_s)


@pytest.mark.parametrize("value", ["two", "\u00b2", "9" * 5000, "-1", "1.5"])
def test_a_nonsense_worker_count_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(decoding.WORKERS_ENV, value)
    with pytest.raises(CnnforgeError, match=f"^{decoding.WORKERS_ENV} must be a whole number"):
        decoding.decode_workers()


def test_a_script_without_a_main_guard_gets_one_line_saying_so(tmp_path):
    """Decoding workers import the main script again (they are not forked): a script that
    decodes at its top level breaks them, and is told why and what to do, in one line."""
    import subprocess

    for i in range(520):  # over two chunks: decoded in worker processes
        Image.new("L", (4, 4), i % 256).save(tmp_path / f"{i}.png")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import glob, os\n"
        "from cnnforge import CnnforgeError, Preprocessing\n"
        "from cnnforge.data.decoding import decode_all\n"
        "paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '*.png')))\n"
        "try:\n"
        "    decode_all(paths, Preprocessing(size=(4, 4), color_mode='L'))\n"
        "except CnnforgeError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    env = {**os.environ, "CNNFORGE_DECODE_WORKERS": "2"}
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("ERROR"))
    assert 'if __name__ == "__main__":' in line and "CNNFORGE_DECODE_WORKERS=1" in line
