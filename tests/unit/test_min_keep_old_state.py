"""A BiP state saved before float min_keep became a fraction of the whole tensor must be refused
with a message that says why (the floors changed meaning), not only two layout dicts.

The old state is fabricated from a new one: the same run with the floors the earlier version
computed (a fraction of the remaining entries of a tensor pruned before).
"""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import torchbip


def test_old_float_min_keep_state_names_the_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    prune.l1_unstructured(model[2], "weight", amount=0.8)  # 80 of 400 entries remain
    bip = torchbip.BiP(model, amount=0.5, min_keep=0.1, steps=4)
    state = bip.state_dict()
    assert state["layout"]["floors"] == [20, 40, 4]  # new rule: 10% of the whole tensors
    old = dict(state)
    old["layout"] = {
        **state["layout"],
        "floors": [20, math.ceil(0.1 * 80), 4],
    }  # earlier rule: of the remaining
    with pytest.raises(ValueError, match=r"only the per-tensor floors or caps differ: a float min_keep"):
        bip.load_state_dict(old)
