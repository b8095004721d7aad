"""The example scripts as modules, for the tests that call their functions in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, module_name: str | None = None) -> ModuleType:
    """Import ``examples/<name>.py`` as the module ``module_name`` (its helper module beside it).

    A test that patches the module's globals passes its own ``module_name``, so that it gets a
    module object of its own.
    """
    if str(EXAMPLES) not in sys.path:  # as when run as a script: its helper module beside it
        sys.path.insert(0, str(EXAMPLES))
    module_name = module_name or f"torchbip_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
