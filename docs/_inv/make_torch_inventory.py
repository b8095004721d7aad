"""Write ``torch.inv``: a small Sphinx inventory of the torch objects these docs link to.

The docs build offline, so intersphinx cannot download torch's own ``objects.inv``. This script
writes an inventory with the handful of torch names that torchbip's docstrings and pages
reference, each pointing at its page in the torch documentation (the same addresses that
torch's inventory gives). Run it after adding a name, and commit the result::

    python docs/_inv/make_torch_inventory.py
"""

from __future__ import annotations

import zlib
from pathlib import Path

OUT = Path(__file__).with_name("torch.inv")

# Objects documented on their own generated page: ``generated/<name>.html#<name>``.
GENERATED = {
    "py:module": [],
    "py:class": [
        "torch.nn.utils.prune.BasePruningMethod",
        "torch.nn.utils.prune.PruningContainer",
        "torch.nn.utils.prune.Identity",
        "torch.nn.utils.prune.RandomUnstructured",
        "torch.nn.utils.prune.L1Unstructured",
        "torch.nn.utils.prune.RandomStructured",
        "torch.nn.utils.prune.LnStructured",
        "torch.nn.utils.prune.CustomFromMask",
        "torch.nn.Module",
        "torch.nn.Sequential",
        "torch.nn.Linear",
        "torch.nn.Conv1d",
        "torch.nn.Conv2d",
        "torch.nn.Conv3d",
        "torch.nn.BatchNorm1d",
        "torch.nn.BatchNorm2d",
        "torch.nn.parameter.Parameter",
        "torch.nn.parallel.DistributedDataParallel",
        "torch.optim.SGD",
        "torch.Generator",
    ],
    "py:function": [
        "torch.nn.utils.prune.identity",
        "torch.nn.utils.prune.random_unstructured",
        "torch.nn.utils.prune.l1_unstructured",
        "torch.nn.utils.prune.random_structured",
        "torch.nn.utils.prune.ln_structured",
        "torch.nn.utils.prune.global_unstructured",
        "torch.nn.utils.prune.custom_from_mask",
        "torch.nn.utils.prune.remove",
        "torch.nn.utils.prune.is_pruned",
        "torch.nn.functional.cross_entropy",
        "torch.func.grad",
        "torch.func.vjp",
        "torch.func.functional_call",
        "torch.kthvalue",
        "torch.save",
        "torch.load",
        "torch.compile",
        "torch.manual_seed",
    ],
}

# Objects documented inside a larger page: ``<page>#<name>``.
ON_PAGE = {
    "py:module": [
        ("torch.nn.utils.prune", "nn.html#module-torch.nn.utils.prune"),
        ("torch.distributed", "distributed.html#module-torch.distributed"),
    ],
    "py:class": [
        ("torch.Tensor", "tensors.html#torch.Tensor"),
        ("torch.device", "tensor_attributes.html#torch.device"),
        ("torch.dtype", "tensor_attributes.html#torch.dtype"),
        ("torch.autocast", "amp.html#torch.autocast"),
        ("torch.utils.data.DataLoader", "data.html#torch.utils.data.DataLoader"),
        ("torch.utils.data.Dataset", "data.html#torch.utils.data.Dataset"),
        ("torch.utils.data.TensorDataset", "data.html#torch.utils.data.TensorDataset"),
        (
            "torch.utils.data.distributed.DistributedSampler",
            "data.html#torch.utils.data.distributed.DistributedSampler",
        ),
    ],
    # Docstrings call torch.autocast with :func: (it is a class that is used like a function).
    "py:function": [("torch.autocast", "amp.html#torch.autocast")],
}

# The names under which objects are defined (what signatures and type hints show) -> public name.
ALIASES = {
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "torch.nn.modules.container.Sequential": "torch.nn.Sequential",
    "torch.nn.modules.linear.Linear": "torch.nn.Linear",
    "torch.nn.modules.conv.Conv1d": "torch.nn.Conv1d",
    "torch.nn.modules.conv.Conv2d": "torch.nn.Conv2d",
    "torch.nn.modules.conv.Conv3d": "torch.nn.Conv3d",
    "torch.nn.Parameter": "torch.nn.parameter.Parameter",
    "torch.utils.data.dataset.TensorDataset": "torch.utils.data.TensorDataset",
    "torch.utils.data.dataset.Dataset": "torch.utils.data.Dataset",
    "torch.utils.data.dataloader.DataLoader": "torch.utils.data.DataLoader",
    "torch.amp.autocast_mode.autocast": "torch.autocast",
    "torch._C.Generator": "torch.Generator",
    "torch.utils.data.DistributedSampler": "torch.utils.data.distributed.DistributedSampler",
}


def entries() -> list[tuple[str, str, str]]:
    """``(name, domain:role, uri)`` for every object, aliases included."""
    rows: list[tuple[str, str, str]] = []
    for role, names in GENERATED.items():
        rows += [(name, role, f"generated/{name}.html#{name}") for name in names]
    for role, pairs in ON_PAGE.items():
        rows += [(name, role, uri) for name, uri in pairs]
    by_name: dict[str, tuple[str, str]] = {}
    for name, role, uri in rows:  # a name listed twice (torch.autocast): its first role wins
        by_name.setdefault(name, (role, uri))
    for alias, target in ALIASES.items():
        role, uri = by_name[target]
        rows.append((alias, role, uri))
    return sorted(rows)


def main() -> None:
    """Write the inventory next to this script."""
    header = (
        "# Sphinx inventory version 2\n"
        "# Project: PyTorch\n"
        "# Version: stable\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in entries())
    OUT.write_bytes(header.encode() + zlib.compress(body.encode(), 9))
    print(f"wrote {OUT} ({len(entries())} objects)")


if __name__ == "__main__":
    main()
