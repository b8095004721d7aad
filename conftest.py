"""Collection rules for the whole checkout (not part of the package).

The trainer integrations import their trainer at import time; where an optional extra is not
installed, their doctests are not collected (their tests under ``tests/integrations`` skip).
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    f"torchbip/integrations/{module}.py"
    for module, needs in (("lightning", "lightning"), ("transformers", "transformers"))
    if importlib.util.find_spec(needs) is None
]
