r"""A reusable pytest suite for :class:`torch.nn.utils.prune.BasePruningMethod` subclasses.

Inherit :class:`PruningMethodContract` in a ``Test*`` class and set the class attributes; pytest
then runs every check below against the method::

    from torchbip import BiPPruningMethod
    from torchbip.testing.contract import PruningMethodContract

    class TestBiPContract(PruningMethodContract):
        METHOD = BiPPruningMethod
        KWARGS = {"amount": 0.5}
        PRUNING_TYPE = "unstructured"

The checks pin the contract that :mod:`torch.nn.utils.prune` keeps for its own methods: the state
after ``apply`` (``<name>_orig`` is the original Parameter, ``<name>_mask`` a buffer, one pruning
hook), ``<name> == <name>_orig * <name>_mask`` after a forward pass, zero gradients on pruned
entries, ``prune.remove``, ``state_dict`` keys, pickling and ``torch.save``, rollback when
``compute_mask`` fails, and composition with :func:`torch.nn.utils.prune.l1_unstructured` in a
:class:`~torch.nn.utils.prune.PruningContainer` in both orders.

Override :meth:`~PruningMethodContract.make_module`, :meth:`~PruningMethodContract.make_input`
or :meth:`~PruningMethodContract.expected_pruned` for other modules or methods. This module
imports :mod:`pytest` (a test dependency); ``import torchbip`` never imports it.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, ClassVar
from unittest import mock

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip.pruned import named_pruning_hooks

__all__ = ["PruningMethodContract", "pruning_hooks"]


def pruning_hooks(module: nn.Module, name: str) -> list[prune.BasePruningMethod]:
    """The pruning hooks of ``module`` that act on tensor ``name``.

    Args:
        module: any module.
        name: the pruned tensor's name, e.g. ``"weight"``.

    Returns:
        The :class:`~torch.nn.utils.prune.BasePruningMethod` forward pre-hooks for ``name``.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=2)
        >>> [type(h).__name__ for h in pruning_hooks(layer, "weight")]
        ['L1Unstructured']
    """
    return [hook for hook_name, hook in named_pruning_hooks(module) if hook_name == name]


def _fresh_copy_loaded(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    fresh = copy.deepcopy(template)
    fresh.load_state_dict(state, strict=True)
    return fresh


class PruningMethodContract:
    """Checks that a pruning method behaves like torch's own methods.

    Configure it with class attributes in a subclass whose name starts with ``Test``.

    Attributes:
        METHOD: the :class:`~torch.nn.utils.prune.BasePruningMethod` subclass under test.
        KWARGS: keyword arguments of ``METHOD.apply`` besides ``module`` and ``name``.
        PRUNING_TYPE: the expected ``METHOD.PRUNING_TYPE``.
        NAME: the name of the pruned tensor of :meth:`make_module`'s module.
        L1_AMOUNT: the ``amount`` of the ``prune.l1_unstructured`` call composed with ``METHOD``.

    Example:
        In a test module, ``class TestMyMethod(PruningMethodContract)`` with ``METHOD`` set is
        all pytest needs; each check is also an ordinary method:

        >>> from torchbip import BiPPruningMethod
        >>> class TestBiP(PruningMethodContract):
        ...     METHOD = BiPPruningMethod
        ...     KWARGS = {"amount": 0.4}
        >>> TestBiP().test_pruned_count()
        >>> TestBiP().test_remove_keeps_values_and_identity()
    """

    METHOD: ClassVar[type[prune.BasePruningMethod]]
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.5}
    PRUNING_TYPE: ClassVar[str] = "unstructured"
    NAME: ClassVar[str] = "weight"
    L1_AMOUNT: ClassVar[float] = 0.5

    # ------------------------------------------------------------------ hooks to override

    def make_module(self) -> nn.Module:
        """A fresh module to prune (the same weights on every call)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Linear(7, 5)

    def make_input(self, module: nn.Module) -> Tensor:
        """A batch for ``module`` (the same values on every call)."""
        in_features = getattr(module, "in_features", 7)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return torch.randn(3, in_features)

    def apply_method(self, module: nn.Module) -> prune.BasePruningMethod:
        """Prune ``module.<NAME>`` with ``METHOD`` and ``KWARGS``."""
        return self.METHOD.apply(module, self.NAME, **self.KWARGS)

    def expected_pruned(self, remaining: int) -> int | None:
        """How many of ``remaining`` entries one application prunes (``None``: not checked).

        The default follows torch's rule for an unstructured ``amount``: ``round(amount * n)``
        for a float, the count itself for an int.
        """
        amount = self.KWARGS.get("amount")
        if self.PRUNING_TYPE != "unstructured" or amount is None or isinstance(amount, bool):
            return None
        if isinstance(amount, int):
            return amount
        return round(float(amount) * remaining)

    # ------------------------------------------------------------------ helpers

    def _parts(self, module: nn.Module) -> tuple[nn.Parameter, Tensor]:
        return getattr(module, self.NAME + "_orig"), getattr(module, self.NAME + "_mask")

    def _dense_outputs(self, module: nn.Module) -> Tensor:
        """Outputs of a never-pruned copy that holds ``orig * mask`` as its plain tensor."""
        orig, mask = self._parts(module)
        state = {
            k: v
            for k, v in module.state_dict().items()
            if k not in (self.NAME + "_orig", self.NAME + "_mask")
        }
        state[self.NAME] = (orig * mask).detach()
        fresh = _fresh_copy_loaded(self.make_module(), state)
        with torch.no_grad():
            return fresh(self.make_input(module))

    # ------------------------------------------------------------------ the contract

    def test_pruning_type(self) -> None:
        """``METHOD.PRUNING_TYPE`` is the configured one and one torch knows."""
        assert getattr(self.METHOD, "PRUNING_TYPE", None) == self.PRUNING_TYPE
        assert self.PRUNING_TYPE in ("unstructured", "structured", "global")

    def test_apply_leaves_torch_state(self) -> None:
        """``<name>_orig`` is the original Parameter, ``<name>_mask`` a binary buffer, one hook."""
        module = self.make_module()
        param = getattr(module, self.NAME)
        hook = self.apply_method(module)
        orig, mask = self._parts(module)
        assert orig is param
        assert self.NAME + "_orig" in dict(module.named_parameters(recurse=False))
        assert self.NAME not in module._parameters
        assert self.NAME + "_mask" in dict(module.named_buffers(recurse=False))
        assert mask.shape == orig.shape
        assert mask.dtype == orig.dtype
        assert mask.device == orig.device
        assert bool(((mask == 0) | (mask == 1)).all())
        assert prune.is_pruned(module)
        hooks = pruning_hooks(module, self.NAME)
        assert hooks == [hook]
        assert isinstance(hook, self.METHOD)
        weight = getattr(module, self.NAME)
        assert not isinstance(weight, nn.Parameter)
        torch.testing.assert_close(weight, orig * mask, rtol=0, atol=0)

    def test_pruned_count(self) -> None:
        """One application prunes the number of entries that ``amount`` asks for."""
        module = self.make_module()
        n = getattr(module, self.NAME).numel()
        expected = self.expected_pruned(n)
        if expected is None:
            pytest.skip("the number of pruned entries is not known for this method")
        self.apply_method(module)
        assert int((self._parts(module)[1] == 0).sum()) == expected

    def test_forward_sets_name_to_orig_times_mask(self) -> None:
        """After a forward pass ``<name>`` equals ``<name>_orig * <name>_mask`` exactly."""
        module = self.make_module()
        self.apply_method(module)
        orig, mask = self._parts(module)
        with torch.no_grad():
            orig.add_(1.0)  # the hook must recompute the masked tensor from the new values
        out = module(self.make_input(module))
        torch.testing.assert_close(getattr(module, self.NAME), orig * mask, rtol=0, atol=0)
        torch.testing.assert_close(out.detach(), self._dense_outputs(module))

    def test_pruned_entries_get_zero_grad(self) -> None:
        """Pruned entries get a zero gradient and stay fixed through an SGD step."""
        module = self.make_module()
        self.apply_method(module)
        orig, mask = self._parts(module)
        module(self.make_input(module)).square().sum().backward()
        assert orig.grad is not None
        assert bool((orig.grad[mask == 0] == 0).all())
        if bool((mask != 0).any()):
            assert bool((orig.grad[mask != 0] != 0).any())
        before = orig.detach().clone()
        torch.optim.SGD(module.parameters(), lr=0.1).step()
        assert bool((orig.detach()[mask == 0] == before[mask == 0]).all())
        module(self.make_input(module))
        assert bool((getattr(module, self.NAME).detach()[mask == 0] == 0).all())

    def test_remove_keeps_values_and_identity(self) -> None:
        """``prune.remove`` leaves the original Parameter object holding ``orig * mask``."""
        module = self.make_module()
        self.apply_method(module)
        orig, mask = self._parts(module)
        expected = (orig * mask).detach().clone()
        outputs = self._dense_outputs(module)
        assert prune.remove(module, self.NAME) is module
        assert getattr(module, self.NAME) is orig
        assert isinstance(orig, nn.Parameter)
        torch.testing.assert_close(orig.detach(), expected, rtol=0, atol=0)
        assert not prune.is_pruned(module)
        assert not hasattr(module, self.NAME + "_orig")
        assert not hasattr(module, self.NAME + "_mask")
        assert pruning_hooks(module, self.NAME) == []
        assert set(module.state_dict()) == set(self.make_module().state_dict())
        fresh = _fresh_copy_loaded(self.make_module(), module.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fresh(self.make_input(module)), outputs, rtol=0, atol=0)

    def test_state_dict_has_torch_keys(self) -> None:
        """``state_dict`` holds what torch's methods leave and loads into an identity-pruned copy."""
        module = self.make_module()
        self.apply_method(module)
        reference = self.make_module()
        prune.identity(reference, self.NAME)
        assert set(module.state_dict()) == set(reference.state_dict())
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        reference.load_state_dict(state, strict=True)
        x = self.make_input(module)
        with torch.no_grad():
            torch.testing.assert_close(reference(x), module(x), rtol=0, atol=0)

    def test_pickle_roundtrip(self) -> None:
        """A pruned module survives ``pickle`` with its mask, hook and outputs."""
        module = self.make_module()
        self.apply_method(module)
        clone = pickle.loads(pickle.dumps(module))
        self._assert_same_pruned(clone, module)

    def test_torch_save_roundtrip(self) -> None:
        """A pruned module survives ``torch.save`` / ``torch.load(weights_only=False)``."""
        module = self.make_module()
        self.apply_method(module)
        module(self.make_input(module))
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
        self._assert_same_pruned(clone, module)

    def test_deepcopy_when_pruned_without_grad(self) -> None:
        """``copy.deepcopy`` works on a module pruned under ``torch.no_grad()``.

        Pruned with gradients on, ``<name>`` is a non-leaf tensor that ``deepcopy`` rejects, for
        torch's own methods too (pytorch issue #37322); pruning under ``no_grad`` avoids it.
        """
        module = self.make_module()
        with torch.no_grad():
            self.apply_method(module)
        clone = copy.deepcopy(module)
        self._assert_same_pruned(clone, module)
        assert self._parts(clone)[0] is not self._parts(module)[0]

    def _assert_same_pruned(self, clone: nn.Module, module: nn.Module) -> None:
        assert prune.is_pruned(clone)
        hooks = pruning_hooks(clone, self.NAME)
        assert len(hooks) == 1
        assert type(hooks[0]) is type(pruning_hooks(module, self.NAME)[0])
        for got, want in zip(self._parts(clone), self._parts(module), strict=True):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
        x = self.make_input(module)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), module(x), rtol=0, atol=0)

    def test_failed_compute_mask_rolls_back(self) -> None:
        """If ``compute_mask`` raises, ``apply`` leaves the module as it was."""
        module = self.make_module()
        param = getattr(module, self.NAME)
        keys = set(module.state_dict())
        buffers = {name for name, _ in module.named_buffers()}
        with (
            mock.patch.object(self.METHOD, "compute_mask", side_effect=RuntimeError("compute_mask failed")),
            pytest.raises(RuntimeError, match="compute_mask failed"),
        ):
            self.apply_method(module)
        assert module._parameters[self.NAME] is param
        assert not prune.is_pruned(module)
        assert not hasattr(module, self.NAME + "_orig")
        assert pruning_hooks(module, self.NAME) == []
        assert set(module.state_dict()) == keys
        assert {name for name, _ in module.named_buffers()} == buffers

    def test_apply_twice_never_revives(self) -> None:
        """A second application prunes among the remaining entries only."""
        module = self.make_module()
        self.apply_method(module)
        first = self._parts(module)[1].clone()
        self.apply_method(module)
        second = self._parts(module)[1]
        assert bool((second <= first).all())
        hooks = pruning_hooks(module, self.NAME)
        assert len(hooks) == 1
        assert isinstance(hooks[0], prune.PruningContainer)
        assert [type(m) for m in hooks[0]] == [self.METHOD, self.METHOD]
        expected = self.expected_pruned(int(first.count_nonzero()))
        if expected is not None:
            assert int((second == 0).sum()) == int((first == 0).sum()) + expected

    def test_container_method_then_l1(self) -> None:
        """``prune.l1_unstructured`` on top of the method composes in a ``PruningContainer``."""
        module = self.make_module()
        self.apply_method(module)
        first = self._parts(module)[1].clone()
        prune.l1_unstructured(module, self.NAME, amount=self.L1_AMOUNT)
        remaining = int(first.count_nonzero())
        zeros = int((self._parts(module)[1] == 0).sum())
        assert zeros == int((first == 0).sum()) + round(self.L1_AMOUNT * remaining)
        self._check_container(module, first, [self.METHOD, prune.L1Unstructured])

    def test_container_l1_then_method(self) -> None:
        """The method on top of ``prune.l1_unstructured`` composes in a ``PruningContainer``."""
        module = self.make_module()
        prune.l1_unstructured(module, self.NAME, amount=self.L1_AMOUNT)
        first = self._parts(module)[1].clone()
        self.apply_method(module)
        expected = self.expected_pruned(int(first.count_nonzero()))
        if expected is not None:
            zeros = int((self._parts(module)[1] == 0).sum())
            assert zeros == int((first == 0).sum()) + expected
        self._check_container(module, first, [prune.L1Unstructured, self.METHOD])

    def _check_container(self, module: nn.Module, first: Tensor, types: list[type]) -> None:
        orig, mask = self._parts(module)
        assert bool((mask <= first).all()), "an entry pruned by the first method was revived"
        hooks = pruning_hooks(module, self.NAME)
        assert len(hooks) == 1
        assert isinstance(hooks[0], prune.PruningContainer)
        assert [type(m) for m in hooks[0]] == types
        module(self.make_input(module))
        torch.testing.assert_close(getattr(module, self.NAME), orig * mask, rtol=0, atol=0)
        outputs = self._dense_outputs(module)
        prune.remove(module, self.NAME)
        assert getattr(module, self.NAME) is orig
        assert set(module.state_dict()) == set(self.make_module().state_dict())
        fresh = _fresh_copy_loaded(self.make_module(), module.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fresh(self.make_input(module)), outputs, rtol=0, atol=0)
