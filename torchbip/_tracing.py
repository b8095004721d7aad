"""What tracing a model with Torch-Pruning's dependency graph needs: the package, the inputs.

Torch-Pruning is an optional extra (``torchbip[export]``); :func:`torch_pruning` imports it when
a feature needs it and says how to install it otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["as_inputs", "torch_pruning"]


def torch_pruning(feature: str) -> Any:
    """Import Torch-Pruning for ``feature`` (its name, for the message), or say how to install it.

    Example:
        >>> torch_pruning("export_slim").__name__
        'torch_pruning'
    """
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as err:  # pragma: no cover - the test environment installs it
        raise ImportError(
            f"{feature} needs Torch-Pruning's dependency graph: pip install 'torchbip[export]' "
            "(or pip install torch-pruning)"
        ) from err


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the tuple of arguments of ``model(*example_inputs)``.

    Example:
        >>> as_inputs(1), as_inputs((1, 2))
        ((1,), (1, 2))
    """
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
