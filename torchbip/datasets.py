"""Small real datasets that need no download: MNIST (in the repository) and scikit-learn's digits.

``load_mnist`` reads an MNIST ``.npz`` file given by ``path`` or the ``TORCHBIP_MNIST``
environment variable, or else the copy in torchbip's source repository, ``data/mnist.npz``
(CC BY-SA 3.0, by Yann LeCun, Corinna Cortes and Christopher J. C. Burges; see the README beside
it), which a source checkout (such as an editable install) finds on its own. The file is not part
of the installed wheel: there, point ``path`` or ``TORCHBIP_MNIST`` at a copy.
``load_digits`` wraps :func:`sklearn.datasets.load_digits` (scikit-learn ships that data).
``mnist_image_folder`` writes MNIST as an ImageNet-layout folder of PNGs, for scripts built on
:class:`torchvision.datasets.ImageFolder`.

Both return a :class:`torch.utils.data.TensorDataset` of ``(images, labels)``: float32 images in
``[0, 1]`` shaped ``N x 1 x H x W`` and int64 labels in ``0..9``.

Example:
    >>> from torchbip.datasets import load_mnist
    >>> test = load_mnist(split="test", per_class=3)
    >>> images, labels = test.tensors
    >>> tuple(images.shape), labels.bincount().tolist()
    ((30, 1, 28, 28), [3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
"""

from __future__ import annotations

import numbers
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["MNIST_ENV", "load_digits", "load_mnist", "mnist_image_folder", "mnist_path"]

Split = Literal["train", "test"]

MNIST_ENV = "TORCHBIP_MNIST"
"""Environment variable that points :func:`load_mnist` at a user's own ``mnist.npz``."""

_CHECKOUT_MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist.npz"
_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


def mnist_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve which MNIST file :func:`load_mnist` reads, and check that it exists.

    The order is: ``path`` if given, else the ``TORCHBIP_MNIST`` environment variable if set and
    not empty, else ``data/mnist.npz`` of the source checkout that torchbip is imported from
    (the folder above the package's; an installed wheel has no such file).

    Args:
        path: a ``.npz`` file with the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Returns:
        The path of an existing file.

    Raises:
        TypeError: if ``path`` is not a str, an ``os.PathLike`` or ``None``.
        FileNotFoundError: if the chosen file does not exist; the message names the path it
            looked at and says how to point at the file instead.

    Example:
        >>> mnist_path().name
        'mnist.npz'
        >>> mnist_path("/no/such/mnist.npz")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: MNIST file not found: /no/such/mnist.npz (from the path argument). ...
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, an os.PathLike or None, got {path!r}")
    if path is not None:
        chosen, origin = Path(path), "from the path argument"
    elif os.environ.get(MNIST_ENV):
        chosen, origin = Path(os.environ[MNIST_ENV]), f"from the {MNIST_ENV} environment variable"
    else:
        chosen = _CHECKOUT_MNIST
        origin = (
            f"the data/mnist.npz of a torchbip source checkout; neither the path argument nor {MNIST_ENV} "
            "was given, and an installed wheel does not include the file"
        )
    if not chosen.is_file():
        raise FileNotFoundError(
            f"MNIST file not found: {chosen} ({origin}). Pass path= or set {MNIST_ENV} to an .npz "
            f"file holding the uint8 arrays {', '.join(_MNIST_KEYS)} (the layout of data/mnist.npz "
            "in torchbip's source repository)."
        )
    return chosen


def load_mnist(
    path: str | os.PathLike[str] | None = None,
    split: Split = "train",
    *,
    per_class: int | None = None,
) -> TensorDataset:
    """Load the MNIST training or test split as tensors, without any download.

    Args:
        path: an ``.npz`` file with the uint8 arrays ``x_train`` (N, 28, 28), ``y_train`` (N,),
            ``x_test`` and ``y_test``. ``None``: the ``TORCHBIP_MNIST`` environment variable, or
            else ``data/mnist.npz`` of the source checkout (see :func:`mnist_path`).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        per_class: keep only the first ``per_class`` images of each digit, in file order (all of
            them where a class has fewer); ``None`` keeps everything.

    Returns:
        A :class:`~torch.utils.data.TensorDataset` of float32 images in ``[0, 1]`` shaped
        ``N x 1 x 28 x 28`` and int64 labels in ``0..9``.

    Raises:
        FileNotFoundError: if the file does not exist (the message names the path).
        TypeError: for a ``path`` that is not a str, an ``os.PathLike`` or ``None``.
        ValueError: for a bad ``split`` or ``per_class``, or a file without the expected arrays.

    Example:
        >>> images, labels = load_mnist(split="test").tensors
        >>> tuple(images.shape), images.dtype, labels.dtype
        ((10000, 1, 28, 28), torch.float32, torch.int64)
        >>> float(images.min()), float(images.max())
        (0.0, 1.0)
        >>> labels[:8].tolist()
        [7, 2, 1, 0, 4, 1, 4, 9]
    """
    _check_split(split)
    _check_per_class(per_class)
    file = mnist_path(path)
    try:
        archive_file = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{file} is not an MNIST .npz archive ({err})") from err
    if not isinstance(archive_file, np.lib.npyio.NpzFile):
        raise ValueError(f"{file} is not an MNIST .npz archive (it holds a single array)")
    with archive_file as archive:
        missing = [k for k in (f"x_{split}", f"y_{split}") if k not in archive.files]
        if missing:
            raise ValueError(f"{file} is not an MNIST archive: it lacks {missing} (has {archive.files})")
        x = archive[f"x_{split}"]
        y = archive[f"y_{split}"]
    if x.ndim != 3 or y.shape != (x.shape[0],):
        raise ValueError(
            f"{file}: expected x_{split} of shape (N, H, W) and y_{split} of shape (N,), "
            f"got {x.shape} and {y.shape}"
        )
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9):
        raise ValueError(
            f"{file}: y_{split} must hold the digits 0..9 as integers, got {y.dtype} {np.unique(y)[:10]}"
        )
    top = 255 if x.dtype == np.uint8 else 1.0
    if x.size and (x.min() < 0 or x.max() > top):
        raise ValueError(
            f"{file}: x_{split} must hold uint8 pixels (0..255) or floats in [0, 1], got {x.dtype} values "
            f"in [{x.min()}, {x.max()}]"
        )
    keep = _per_class_indices(y, per_class)
    if keep is not None:
        x, y = x[keep], y[keep]
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    images = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(scale).unsqueeze(1)
    return TensorDataset(images, torch.from_numpy(y.astype(np.int64)))


def mnist_image_folder(
    root: str | os.PathLike[str],
    *,
    train_per_class: int = 100,
    val_per_class: int = 30,
    size: int = 64,
    path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write MNIST as an ImageNet-layout folder of RGB PNGs, for ``ImageFolder`` pipelines.

    ``root/train/<digit>/*.png`` holds the first ``train_per_class`` training images of each
    digit, ``root/val/<digit>/*.png`` the first ``val_per_class`` test images, each resized to
    ``size`` x ``size`` pixels (bilinear) and stored as RGB. A training script written for
    ImageNet (:class:`torchvision.datasets.ImageFolder` with its usual transforms) then runs
    unchanged on data that needs no download. The folder is written once, atomically: it is
    either complete or absent, and an existing ``root`` is returned as it is.

    Args:
        root: the folder to write (its parent is created).
        train_per_class: training images per digit (at least 1).
        val_per_class: validation images per digit (at least 1).
        size: side of the square images in pixels (at least 1).
        path: the MNIST ``.npz`` file, as for :func:`load_mnist`.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: if the MNIST file does not exist.
        TypeError: for a ``path`` that is not a str, an ``os.PathLike`` or ``None``.
        ValueError: for a count or size that is not a positive integer.

    Example:
        >>> import tempfile
        >>> from torchvision.datasets import ImageFolder
        >>> folder = mnist_image_folder(tempfile.mkdtemp() + "/digits", train_per_class=2, val_per_class=1)
        >>> train = ImageFolder(folder / "train")
        >>> len(train), train.classes[:3], train[0][0].size, train[0][0].mode
        (20, ['0', '1', '2'], (64, 64), 'RGB')
    """
    for name, value in (
        ("train_per_class", train_per_class),
        ("val_per_class", val_per_class),
        ("size", size),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    train_per_class, val_per_class, size = int(train_per_class), int(val_per_class), int(size)
    folder = Path(root)
    if folder.is_dir():
        return folder
    from PIL import Image  # comes with torchvision

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    try:
        splits: tuple[tuple[str, Split, int], ...] = (
            ("train", "train", train_per_class),
            ("val", "test", val_per_class),
        )
        for split, source, per_class in splits:
            images, labels = load_mnist(path, source, per_class=per_class).tensors
            for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
                (tmp / split / str(label)).mkdir(parents=True, exist_ok=True)
                pixels = (image[0] * 255).round().to(torch.uint8).numpy()
                rgb = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                rgb.save(tmp / split / str(label) / f"mnist_{source}_{i:05d}.png")
        (tmp / "README.txt").write_text(
            "Made from MNIST by torchbip.datasets.mnist_image_folder "
            "(Yann LeCun, Corinna Cortes, Christopher J. C. Burges; CC BY-SA 3.0).\n"
        )
        if not folder.is_dir():  # another process may have finished first
            os.replace(tmp, folder)  # the folder is complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_digits(
    split: Split = "train",
    *,
    test_size: float = 0.2,
    seed: int = 0,
    per_class: int | None = None,
) -> TensorDataset:
    """Load scikit-learn's 8x8 digits (1,797 images) as a stratified training or test split.

    The split is deterministic for a given ``seed`` and ``test_size``, so the ``"train"`` and
    ``"test"`` calls with the same arguments never overlap. scikit-learn ships this data; it is
    imported only when this function is called.

    Args:
        split: ``"train"`` or ``"test"``.
        test_size: fraction of the images in the test split, a real number in ``(0, 1)``.
        seed: seed of the stratified shuffle, an int in ``[0, 2**32 - 1]`` (NumPy's range).
        per_class: keep only the first ``per_class`` images of each digit of the split.

    Returns:
        A :class:`~torch.utils.data.TensorDataset` of float32 images in ``[0, 1]`` shaped
        ``N x 1 x 8 x 8`` and int64 labels in ``0..9``.

    Raises:
        ImportError: if scikit-learn is not installed (it comes with the ``test`` extra).
        ValueError: for a bad ``split``, ``test_size``, ``seed`` or ``per_class``.

    Example:
        >>> train, test = load_digits("train"), load_digits("test")
        >>> len(train), len(test)
        (1437, 360)
        >>> tuple(test.tensors[0].shape[1:]), test.tensors[1].dtype
        ((1, 8, 8), torch.int64)
    """
    _check_split(split)
    _check_per_class(per_class)
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real) or not 0 < test_size < 1:
        raise ValueError(f"test_size must be a float in (0, 1), got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed must be an int in [0, 2**32 - 1], got {seed!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "torchbip.datasets.load_digits needs scikit-learn; install the test extra "
            "(pip install 'torchbip[test]') or scikit-learn itself (pip install scikit-learn)"
        ) from err
    bunch = sklearn_digits()
    x = np.asarray(bunch.images, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=float(test_size), stratify=y, random_state=int(seed)
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    x, y = x[idx], y[idx]
    keep = _per_class_indices(y, per_class)
    if keep is not None:
        x, y = x[keep], y[keep]
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(y))


def _check_split(split: object) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_per_class(per_class: object) -> None:
    if per_class is not None and (
        isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class < 1
    ):
        raise ValueError(f"per_class must be an int >= 1 or None, got {per_class!r}")


def _per_class_indices(labels: np.ndarray, per_class: int | None) -> np.ndarray | None:
    """Indices (in order) of the first ``per_class`` entries of each label; ``None``: keep all."""
    if per_class is None:
        return None
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)
