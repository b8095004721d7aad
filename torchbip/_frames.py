"""Where a warning about the user's call belongs: the first stack frame outside torchbip.

(Frames of torch's decorators around torchbip's functions, such as ``torch.no_grad()``, count
as torchbip's.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType

import torch.utils._contextlib

__all__ = ["user_stacklevel"]

_TORCH_DECORATORS = str(Path(torch.utils._contextlib.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside torchbip, for its caller's ``warnings.warn``.

    Example:
        >>> user_stacklevel() >= 1
        True
    """
    package = str(Path(__file__).resolve().parent)
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename == _TORCH_DECORATORS
    ):
        frame, level = frame.f_back, level + 1
    return level
