"""Image folders of any sizes and modes, and the one preprocessing definition."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnforge
from cnnforge import CnnforgeError, CnnforgeWarning, Preprocessing
from cnnforge.core.preprocessing import default_size, parse_size, to_mode
from cnnforge.data.folders import scan_image_folder

RNG = np.random.default_rng(0)


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _gray(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width), dtype=np.uint8), "L")


def mixed_folder(root: Path, per_class: int = 6) -> Path:
    """Two classes of PNG/JPEG images of several sizes: RGB, grayscale, RGBA, palette, 16-bit,
    CMYK; plus a hidden file, a hidden folder, a text file and a corrupt image."""
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            width, height = 20 + 4 * i, 16 + 2 * c + i
            kind = i % 6
            path = root / name / f"{i}"
            if kind == 0:
                _save(path.with_suffix(".jpg"), _rgb(width, height), quality=90)
            elif kind == 1:
                _save(path.with_suffix(".png"), _gray(width, height))
            elif kind == 2:
                _save(path.with_suffix(".png"), _rgb(width, height).convert("RGBA"))
            elif kind == 3:
                _save(path.with_suffix(".png"), _rgb(width, height).convert("P"))
            elif kind == 4:
                array = RNG.integers(0, 65536, (height, width), dtype=np.uint16)
                _save(path.with_suffix(".png"), Image.fromarray(array))
            else:
                _save(path.with_suffix(".jpg"), _rgb(width, height).convert("CMYK"))
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / "dog" / ".thumbs" / "t.png", _gray(8, 8))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


def test_mixed_folder_reads_at_one_size_with_skips_and_ignores_counted(tmp_path):
    root = mixed_folder(tmp_path / "photos")
    with pytest.warns(CnnforgeWarning, match=r"skipped 1 unreadable image.*broken\.png"):
        data = cnnforge.load_dataset(f"dir:{root}", preprocessing=Preprocessing(size=(24, 32)))
    assert data.spec.input_shape == (24, 32, 3)  # colour: not every image is grayscale
    assert data.preprocessing == Preprocessing(size=(24, 32), color_mode="RGB")
    assert list(data.skipped) == [str(root / "dog" / "broken.png")]
    assert data.ignored == {"hidden": 2, "not an image": 1}
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 12
    assert data.x_train.dtype == np.uint8


def test_postscript_in_a_folder_is_ignored_or_skipped_by_name_never_opened(tmp_path, postscript):
    from cnnforge.data.decoding import decode_files

    root = mixed_folder(tmp_path / "photos", per_class=2)
    (root / "cat" / "drawing.eps").write_bytes(postscript)  # not an image suffix: ignored
    (root / "dog" / "disguised.png").write_bytes(postscript)  # a PostScript body: skipped
    with pytest.warns(CnnforgeWarning, match=r"skipped 2 unreadable image"):
        data = cnnforge.load_dataset(f"dir:{root}", preprocessing=Preprocessing(size=(24, 32)))
    reason = data.skipped[str(root / "dog" / "disguised.png")]
    assert "is EPS, a format cnnforge does not open" in reason
    assert data.ignored == {"hidden": 2, "not an image": 2}
    _, failed = decode_files([str(root / "dog" / "disguised.png")], data.preprocessing)
    assert "is EPS, a format cnnforge does not open" in failed[0]


def test_size_and_mode_are_chosen_from_the_data(tmp_path):
    for name in ("a", "b"):
        for i, size in enumerate([(40, 30), (60, 30), (400, 300)]):
            _save(tmp_path / name / f"{i}.png", _gray(*size))
    scan = scan_image_folder(tmp_path)
    chosen = scan.preprocessing()
    assert chosen.size == (30, 60) and chosen.color_mode == "L"
    assert default_size([(1000, 500)] * 3) == (64, 128)  # the longer side capped at 128


def test_strict_data_refuses_unreadable_images(tmp_path):
    root = mixed_folder(tmp_path / "photos")
    with pytest.raises(CnnforgeError, match=r"cannot read image .*broken\.png.*--strict-data"):
        cnnforge.load_dataset(f"dir:{root}", strict=True)


def test_split_folders_are_honoured(tmp_path):
    for split, count in (("train", 6), ("validation", 2), ("test", 3)):
        for name in ("a", "b"):
            for i in range(count):
                _save(tmp_path / split / name / f"{i}.png", _rgb(10, 12))
    data = cnnforge.load_dataset(f"dir:{tmp_path}")
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (12, 4, 6)


@pytest.mark.parametrize("layout", ["split", "classes", "split-named classes"])
def test_a_class_named_train_is_not_read_as_a_split(tmp_path, layout):
    """CIFAR-100 has a class "train": class folders at the top, one of them named train/, are
    classes; only split names at the top (train/ test/ val/) holding folders are a split
    layout (split-named folders of images are classes). ``cnnforge data`` says which."""
    from click.testing import CliRunner

    from cnnforge.cli import cli

    names = {"split": ("a", "b"), "classes": ("train", "tulip", "test")}.get(
        layout, ("train", "test")
    )
    for name in names:
        for i in range(3):
            path = tmp_path / "train" / name if layout == "split" else tmp_path / name
            _save(path / f"{i}.png", _rgb(10, 12))
            if layout == "split":
                _save(tmp_path / "test" / name / f"{i}.png", _rgb(10, 12))
    scan = scan_image_folder(tmp_path)
    result = CliRunner().invoke(cli, ["data", str(tmp_path)])
    assert result.exit_code == 0, result.output
    if layout == "split":
        assert scan.class_names == ("a", "b") and set(scan.splits) == {"train", "test"}
        assert "layout: split folders test/, train/ holding the class folders" in result.output
    else:
        assert scan.class_names == tuple(sorted(names)) and set(scan.splits) == {"all"}
        assert "layout: class folders at the top (test/, train/ are classes" in result.output


def test_split_folder_errors_name_the_class(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / "train" / name / "0.png", _rgb(10, 12))
    _save(tmp_path / "test" / "a" / "0.png", _rgb(10, 12))
    with pytest.raises(CnnforgeError, match=r"class 'b' has no folder in .*test"):
        cnnforge.load_dataset(f"dir:{tmp_path}")
    (tmp_path / "test" / "b").mkdir()
    with pytest.raises(CnnforgeError, match=r"class\(es\) b have no images in .*test"):
        cnnforge.load_dataset(f"dir:{tmp_path}")


def test_empty_class_folder_is_named(tmp_path):
    _save(tmp_path / "a" / "0.png", _rgb(10, 12))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(CnnforgeError, match=r"class folder\(s\) b in .* have no readable images"):
        cnnforge.load_dataset(f"dir:{tmp_path}")


def test_npz_with_negative_labels_names_the_labels(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    y = np.array([-1, -2, -1, -2])
    np.savez(tmp_path / "neg.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(CnnforgeError, match=r"labels range over -2..-1.*0..N-1"):
        cnnforge.load_dataset(str(tmp_path / "neg.npz"))


def test_image_size_resizes_array_data_too():
    data = cnnforge.load_dataset("fashion_mnist_small", preprocessing=Preprocessing(size=(16, 20)))
    assert data.spec.input_shape == (16, 20, 1)
    assert data.preprocessing.size == (16, 20) and data.preprocessing.color_mode == "L"


@pytest.mark.parametrize(
    ("text", "size"), [("64", (64, 64)), ("48x64", (48, 64)), ("48X64", (48, 64)), (None, None)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "x", "1x2x3", "big"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(CnnforgeError, match="not N or HxW"):
        parse_size(text)


def test_modes_convert_predictably():
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))  # fully transparent → black
    assert np.asarray(to_mode(rgba, "RGB")).max() == 0
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_mode(sixteen, "L")).min() == 255  # scaled, not clipped to 255 of 65535
    half = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    assert np.asarray(to_mode(half, "L")).max() == 128
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_mode(cmyk, "RGB")).min() == 255


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
def test_resize_policies(policy):
    # a white 40×20 image with a black right half: what each policy keeps differs
    array = np.full((20, 40), 255, np.uint8)
    array[:, 20:] = 0
    out = Preprocessing(size=(20, 20), policy=policy, color_mode="L").apply(Image.fromarray(array))
    assert out.shape == (20, 20, 1)
    top, middle = out[0, :, 0], out[10, :, 0]
    if policy == "stretch":
        assert middle[0] == 255 and middle[-1] == 0
    elif policy == "crop":  # the centre 20×20: half white, half black
        assert middle[0] == 255 and middle[-1] == 0 and out.shape[1] == 20
    else:  # letterboxed: black bars above and below
        assert top.max() == 0 and middle[0] == 255


def test_exif_orientation_is_applied(tmp_path):
    image = _rgb(30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.jpg").write_bytes(buffer.getvalue())
    scan = scan_image_folder(tmp_path)
    assert scan.images[0].size == (10, 30)  # (W, H) upright
    assert scan.preprocessing().size == (30, 10)


def test_preprocessing_round_trips_through_json():
    used = Preprocessing(size=(8, 9), policy="pad", interpolation="area", color_mode="L")
    assert Preprocessing.from_json(used.to_json()) == used
    with pytest.raises(CnnforgeError, match="resize policy 'squash' is unknown"):
        Preprocessing(policy="squash")


def test_data_command_summarises_a_folder(tmp_path):
    from click.testing import CliRunner

    from cnnforge.cli import cli

    root = mixed_folder(tmp_path / "photos")
    for i in range(30):  # make "cat" six times the size of "dog"
        _save(root / "cat" / f"extra{i}.png", _gray(24, 18))
    result = CliRunner().invoke(
        cli, ["data", str(root), "--image-size", "24x32", "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    assert "imbalanced" in result.output and "--class-weight auto" in result.output
    assert "would read as 24x32 RGB, stretch, bilinear" in result.output
    assert "1 not an image" in result.output and "broken.png" in result.output
    import json

    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["counts"] == {"all": [36, 6]}
    assert saved["modes"]["L"] == 32 and saved["imbalanced"]
    assert saved["epoch_read_s"] > 0
    strict = CliRunner().invoke(cli, ["data", str(root), "--strict-data"])
    assert strict.exit_code == 1 and "cannot read image" in strict.output


def test_class_weights_balance_the_classes(tmp_path):
    for name, count in (("a", 9), ("b", 3)):
        for i in range(count):
            _save(tmp_path / "train" / name / f"{i}.png", _gray(8, 8))
        _save(tmp_path / "test" / name / "0.png", _gray(8, 8))
        _save(tmp_path / "val" / name / "0.png", _gray(8, 8))
    weights = cnnforge.load_dataset(f"dir:{tmp_path}").class_weights()
    assert weights == pytest.approx({0: 12 / 18, 1: 12 / 6})


def test_data_json_of_a_source_with_an_empty_class_is_valid_json(tmp_path):
    """A class without images has no imbalance ratio: JSON null, flagged, never ``Infinity``."""
    import json

    from click.testing import CliRunner

    from cnnforge.cli import cli

    x = np.zeros((12, 8, 8, 1), dtype=np.uint8)
    y = np.array([0] * 8 + [1] * 4)  # "c" has no images
    np.savez(
        tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=["a", "b", "c"]
    )
    out = tmp_path / "s.json"
    result = CliRunner().invoke(cli, ["data", str(tmp_path / "d.npz"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "imbalanced (a class has no images)" in result.output

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads(out.read_text(), parse_constant=refuse)
    assert saved["imbalance"] is None and saved["imbalanced"] is True
