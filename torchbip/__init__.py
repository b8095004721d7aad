"""torchbip: bi-level pruning (BiP) as a drop-in for :mod:`torch.nn.utils.prune`.

Example:
    >>> import torchbip
    >>> sorted(torchbip.__all__)[:3]
    ['BiP', 'BiPConfig', 'BiPPruningMethod']
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# The first torch.optim optimizer of a process imports torch._dynamo, which then keeps references
# to the default process group of torch.distributed if one exists already: destroy_process_group()
# no longer frees it and the process can abort at exit ("terminate called without an active
# exception"). Imported with torchbip, before the user starts a process group, it holds none.
import torch._dynamo  # noqa: F401

from torchbip import bilevel, layouts
from torchbip.api import global_prune
from torchbip.config import BiPConfig
from torchbip.coupled import Coupled
from torchbip.export import export_slim, load_slim_state_dict
from torchbip.layouts import NM, Groups, Layout, Unstructured
from torchbip.method import BiPPruningMethod, bip_unstructured
from torchbip.pruner import BiP
from torchbip.report import PruneReport, SparsityReport, sparsity_report
from torchbip.structured import BiPStructured, bip_structured

try:
    __version__ = version("torchbip")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "NM",
    "BiP",
    "BiPConfig",
    "BiPPruningMethod",
    "BiPStructured",
    "Coupled",
    "Groups",
    "Layout",
    "PruneReport",
    "SparsityReport",
    "Unstructured",
    "__version__",
    "bilevel",
    "bip_structured",
    "bip_unstructured",
    "export_slim",
    "global_prune",
    "layouts",
    "load_slim_state_dict",
    "sparsity_report",
]
