"""``torchbip.datasets``: the repository's MNIST split and scikit-learn's digits."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchbip import datasets
from torchbip.datasets import MNIST_ENV, load_digits, load_mnist, mnist_path

TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MNIST_ENV, raising=False)


def _write_npz(path: Path, n_train: int = 20, n_test: int = 10, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_checkout_file_is_plain_uint8() -> None:
    path = mnist_path()
    assert path == Path(datasets.__file__).resolve().parents[1] / "data" / "mnist.npz"
    assert (path.parent / "README.md").is_file()
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert all(archive[k].dtype == np.uint8 for k in archive.files)


def test_mnist_test_split() -> None:
    images, labels = load_mnist(split="test").tensors
    assert images.shape == (10_000, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert float(images.min()) == 0.0
    assert float(images.max()) == 1.0
    assert int(labels.min()) == 0
    assert int(labels.max()) == 9
    assert labels.bincount().tolist() == TEST_COUNTS


def test_mnist_train_split() -> None:
    images, labels = load_mnist(split="train").tensors
    assert images.shape == (60_000, 1, 28, 28)
    assert labels.bincount().tolist() == TRAIN_COUNTS
    assert images[0].mul(255).round().eq(images[0].mul(255)).all()  # exact k/255 values


def test_mnist_per_class_keeps_the_first_of_each_class_in_order() -> None:
    _, all_labels = load_mnist(split="test").tensors
    images, labels = load_mnist(split="test", per_class=7).tensors
    assert labels.bincount().tolist() == [7] * 10
    expected = sorted(i for d in range(10) for i in torch.nonzero(all_labels == d).flatten()[:7].tolist())
    full_images = load_mnist(split="test").tensors[0]
    torch.testing.assert_close(images, full_images[expected])
    assert labels.tolist() == all_labels[expected].tolist()


def test_mnist_per_class_larger_than_a_class(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "small.npz", n_test=10)
    _, labels = load_mnist(path, "test", per_class=5).tensors
    assert labels.tolist() == list(range(10))


def test_mnist_from_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = _write_npz(tmp_path / "own.npz", n_train=30)
    images, labels = load_mnist(own).tensors
    assert images.shape == (30, 1, 28, 28)
    assert labels.tolist() == [i % 10 for i in range(30)]
    assert len(load_mnist(str(own), split="test")) == 10

    env_file = _write_npz(tmp_path / "env.npz", n_train=40)
    monkeypatch.setenv(MNIST_ENV, str(env_file))
    assert len(load_mnist()) == 40
    assert len(load_mnist(own)) == 30  # the argument wins over the environment variable


def test_mnist_missing_file_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(FileNotFoundError, match=r"MNIST file not found: .*nowhere.*mnist\.npz") as info:
        load_mnist(missing)
    assert str(missing) in str(info.value)
    assert "path argument" in str(info.value)

    monkeypatch.setenv(MNIST_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=MNIST_ENV) as info:
        load_mnist(split="test")
    assert str(missing) in str(info.value)


def test_mnist_missing_checkout_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_CHECKOUT_MNIST", tmp_path / "gone.npz")
    with pytest.raises(
        FileNotFoundError, match=r"gone\.npz \(the data/mnist\.npz of a torchbip source checkout"
    ) as info:
        load_mnist()
    message = str(info.value)
    assert "neither the path argument nor " + MNIST_ENV in message
    assert "Pass path= or set " + MNIST_ENV in message


def test_mnist_rejects_pickled_and_incomplete_archives(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([object()], dtype=object), y_train=np.zeros(1, dtype=np.uint8))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_mnist(pickled)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"not an MNIST archive: it lacks \['y_train'\]"):
        load_mnist(partial)
    shapes = _write_npz(tmp_path / "shapes.npz", y_test=np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected x_test of shape \(N, H, W\)"):
        load_mnist(shapes, "test")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            {"y_train": np.array([0, 57, -1] + [1] * 17)},
            r"y_train must hold the digits 0\.\.9 as integers, got int64",
        ),
        ({"y_train": np.linspace(0, 9, 20)}, r"y_train must hold the digits 0\.\.9 as integers, got float64"),
        (
            {"x_train": np.full((20, 28, 28), 255.0, dtype=np.float32)},
            r"x_train must hold uint8 pixels \(0\.\.255\) or floats in \[0, 1\], got float32 values in "
            r"\[255\.0, 255\.0\]",
        ),
    ],
)
def test_mnist_refuses_labels_and_pixels_outside_the_documented_ranges(tmp_path: Path, extra, match) -> None:
    path = _write_npz(tmp_path / "odd.npz", **extra)
    with pytest.raises(ValueError, match=match):
        load_mnist(path)


def test_mnist_a_file_that_is_not_an_npz_archive_is_named(tmp_path: Path) -> None:
    text = tmp_path / "mnist.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=rf"{text} is not an MNIST \.npz archive"):
        load_mnist(text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match=r"is not an MNIST \.npz archive \(it holds a single array\)"):
        load_mnist(single)


def test_mnist_and_digits_take_numpy_integer_counts() -> None:
    assert len(load_mnist(split="test", per_class=np.int64(2))) == 20
    assert len(load_digits("test", per_class=np.int64(2))) == 20


PER_CLASS = "per_class must be an int >= 1 or None, got "


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"split": "val"}, "split must be 'train' or 'test', got 'val'", id="split"),
        pytest.param({"per_class": 0}, PER_CLASS + "0", id="per_class-0"),
        pytest.param({"per_class": 2.5}, PER_CLASS + "2.5", id="per_class-float"),
        pytest.param({"per_class": True}, PER_CLASS + "True", id="per_class-bool"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_mnist(**kwargs)
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


def test_digits_splits() -> None:
    pytest.importorskip("sklearn")
    train, test = load_digits("train"), load_digits("test")
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (1437, 1, 8, 8)
    assert x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0
    assert float(x_train.max()) == 1.0
    digit_counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (y_train.bincount() + y_test.bincount()).tolist() == digit_counts
    assert y_test.bincount().min() >= 34  # stratified
    # Disjoint: no test image also appears in the training split.
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in x_test.flatten(1).tolist())
    assert overlap <= 2  # the digits data holds a few exact duplicates
    torch.testing.assert_close(load_digits("test").tensors[0], x_test)  # deterministic
    assert len(load_digits("test", test_size=0.5)) in (898, 899)
    assert load_digits("train", per_class=3).tensors[1].bincount().tolist() == [3] * 10
    with pytest.raises(ValueError, match="test_size must be a float in"):
        load_digits(test_size=1.0)


def test_digits_take_numpy_numbers() -> None:
    """Any real ``test_size`` and integral ``seed``, NumPy scalars too: 0.25 of 1,797 is 450 test images."""
    pytest.importorskip("sklearn")
    plain = load_digits("test", test_size=0.25, seed=3).tensors
    numpy = load_digits("test", test_size=np.float32(0.25), seed=np.int64(3)).tensors
    assert len(plain[1]) == len(numpy[1]) == 450
    assert all(torch.equal(a, b) for a, b in zip(plain, numpy, strict=True))


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0", None], ids=repr)
def test_digits_seed_is_checked_by_name(seed: object) -> None:
    """NumPy's seeds are the ints in [0, 2**32 - 1]; anything else is named before scikit-learn runs."""
    with pytest.raises(ValueError, match=re.escape(f"seed must be an int in [0, 2**32 - 1], got {seed!r}")):
        load_digits(seed=seed)  # type: ignore[arg-type]


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"needs scikit-learn; install the test extra"):
        load_digits()


# -- mnist_image_folder -----------------------------------------------------------------------


def test_mnist_image_folder_writes_imagenet_layout_pngs_of_the_split(tmp_path: Path) -> None:
    from PIL import Image

    source = _write_npz(tmp_path / "m.npz", n_train=30, n_test=20)
    folder = datasets.mnist_image_folder(
        tmp_path / "cache" / "digits", train_per_class=2, val_per_class=1, size=28, path=source
    )
    assert folder == tmp_path / "cache" / "digits"
    with np.load(source) as arrays:
        x_train, x_test = arrays["x_train"], arrays["x_test"]
    for split, per_class, x in (("train", 2, x_train), ("val", 1, x_test)):
        assert sorted(p.name for p in (folder / split).iterdir()) == [str(d) for d in range(10)]
        for digit in range(10):
            files = sorted((folder / split / str(digit)).glob("*.png"))
            assert len(files) == per_class
            # label d is at rows d, d + 10, ... of the file (labels are i % 10); size 28: no resize
            for k, file in enumerate(files):
                image = Image.open(file)
                assert image.mode == "RGB"
                pixels = np.asarray(image)
                assert (pixels == x[digit + 10 * k][:, :, None]).all()
    assert not list(folder.parent.glob(".*building-*"))


def test_mnist_image_folder_resizes_and_reuses_an_existing_folder(tmp_path: Path) -> None:
    from PIL import Image

    source = _write_npz(tmp_path / "m.npz")
    root = tmp_path / "digits"
    datasets.mnist_image_folder(root, train_per_class=1, val_per_class=1, size=40, path=source)
    (png,) = (root / "train" / "3").glob("*.png")
    assert Image.open(png).size == (40, 40)
    stamp = png.stat().st_mtime_ns
    assert datasets.mnist_image_folder(root, train_per_class=1, val_per_class=1, path=source) == root
    assert png.stat().st_mtime_ns == stamp  # not rewritten


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_per_class": 0}, "train_per_class must be a positive integer, got 0"),
        ({"val_per_class": 1.5}, "val_per_class must be a positive integer, got 1.5"),
        ({"size": True}, "size must be a positive integer, got True"),
    ],
)
def test_mnist_image_folder_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        datasets.mnist_image_folder(tmp_path / "digits", **kwargs)
    assert not (tmp_path / "digits").exists()


def test_mnist_image_folder_takes_numpy_integer_counts(tmp_path: Path) -> None:
    from PIL import Image

    source = _write_npz(tmp_path / "m.npz")
    root = datasets.mnist_image_folder(
        tmp_path / "digits",
        train_per_class=np.int64(2),
        val_per_class=np.int32(1),
        size=np.int64(12),
        path=source,
    )
    assert len(list((root / "train").glob("*/*.png"))) == 20
    assert len(list((root / "val").glob("*/*.png"))) == 10
    assert Image.open(next((root / "val").glob("*/*.png"))).size == (12, 12)


def test_mnist_path_of_another_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"path must be a str, an os\.PathLike or None, got 3"):
        load_mnist(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"path must be a str, an os\.PathLike or None, got b'm\.npz'"):
        datasets.mnist_image_folder(tmp_path / "digits", path=b"m.npz")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_mnist_image_folder_missing_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST file not found"):
        datasets.mnist_image_folder(tmp_path / "digits", path=tmp_path / "none.npz")
    assert list(tmp_path.iterdir()) == []
