"""BiP inside other tools: trainer callbacks, and an importance for Torch-Pruning.

Each integration lives in its own module and imports its trainer only when it is imported
itself, so ``import torchbip`` never needs them:

- :mod:`torchbip.integrations.lightning`: :class:`~torchbip.integrations.lightning.BiPCallback`
  for :class:`lightning.pytorch.Trainer` (``pip install "torchbip[lightning]"``);
- :mod:`torchbip.integrations.transformers`:
  :class:`~torchbip.integrations.transformers.BiPTrainerCallback` for
  :class:`transformers.Trainer` (``pip install "torchbip[transformers]"``);
- :mod:`torchbip.integrations.torch_pruning`:
  :class:`~torchbip.integrations.torch_pruning.BiPImportance`, BiP's learned channel scores as
  an importance for Torch-Pruning's own pruners (``pip install "torchbip[export]"``).

The callbacks build one :class:`torchbip.BiP` on the model before the trainer creates its
optimizer, call :meth:`~torchbip.BiP.step` after every optimizer step (so gradient
accumulation, clipping and mixed precision are the trainer's), save the BiP state with the
trainer's checkpoints, and call :meth:`~torchbip.BiP.finish` when training ends.
"""
