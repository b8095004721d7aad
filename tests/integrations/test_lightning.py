"""``BiPCallback`` inside a real ``lightning.pytorch.Trainer`` on the CPU.

Oracles: the same BiP in a plain loop over the same batches (masks and weights must be equal),
exact counts of zeros, a strict ``load_state_dict`` into a fresh model, and an uninterrupted run
for resume.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

L = pytest.importorskip("lightning.pytorch")
from torchbip.integrations.lightning import BiPCallback  # noqa: E402

AMOUNT = 0.8
BATCHES = 4  # per epoch
EPOCHS = 2


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def dataset() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCHES * 16, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return list(zip(x, y, strict=True))


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=False)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class Classifier(L.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_net(seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self.parameters())


def trainer(callbacks, tmp_path=None, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": EPOCHS, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "deterministic": True,
    }  # fmt: skip
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(callbacks=callbacks, **options)


def fit(trainer_: L.Trainer, module: L.LightningModule, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and logging
        trainer_.fit(module, loader(), **kwargs)


def own_loop(accumulate: int = 1, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torchbip.BiP]:
    """The same training in a plain loop: the oracle."""
    net = make_net().to(dtype)
    pruner = torchbip.BiP(net, AMOUNT, steps=BATCHES * EPOCHS // accumulate)
    optimizer = make_optimizer(net.parameters())
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(loader()):
            (F.cross_entropy(net(x.to(dtype)), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad()
                pruner.step()
    pruner.finish()
    return net, pruner


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_equals_own_loop(accumulate: int) -> None:
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], accumulate_grad_batches=accumulate), module)
    net, pruner = own_loop(accumulate)
    assert callback.pruner is not None
    assert callback.pruner.step_count == pruner.step_count == BATCHES * EPOCHS // accumulate
    assert callback.pruner.steps == BATCHES * EPOCHS // accumulate  # estimated_stepping_batches
    assert_same_state(module.net, net)
    # BiP moved the masks away from the magnitude top-k of the initial weights
    init = make_net()
    magnitude = torchbip.BiP(init, AMOUNT)
    assert any(not torch.equal(a, b) for a, b in zip(pruner.keeps, magnitude.keeps, strict=True))


def test_lightning_exact_sparsity_and_strict_reload_after_remove() -> None:
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT, remove=True)
    fit(trainer([callback]), module)
    assert callback.report is not None
    assert not prune.is_pruned(module)
    weights = [module.net[i].weight for i in (0, 2, 4)]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(AMOUNT * total)
    assert callback.report.global_sparsity == pytest.approx(round(AMOUNT * total) / total, abs=0)
    fresh = make_net(seed=1)
    fresh.load_state_dict(module.net.state_dict(), strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), module.net(x), rtol=0, atol=0)
    assert all(isinstance(module.net[i].weight, nn.Parameter) for i in (0, 2, 4))


def test_lightning_keeps_pruned_form_and_masks_stay_fixed_in_a_second_fit() -> None:
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback]), module)
    assert prune.is_pruned(module)
    assert not any("scores" in k for k in module.state_dict())
    masks = [module.net[i].weight_mask.clone() for i in (0, 2, 4)]
    second = trainer([callback], max_epochs=1)
    with pytest.warns(UserWarning, match="this fit\\(\\) trains it with the masks fixed"):
        second.fit(module, loader())
    for i, mask in zip((0, 2, 4), masks, strict=True):
        assert torch.equal(module.net[i].weight_mask, mask)
        assert bool((module.net[i].weight[mask == 0] == 0).all())


def test_lightning_resume_from_checkpoint_equals_uninterrupted(tmp_path) -> None:
    """Resume from the first epoch's checkpoint of a run: the end equals the run's own end."""
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    whole = Classifier()
    whole_callback = BiPCallback(amount=AMOUNT)
    fit(trainer([whole_callback, checkpoint], enable_checkpointing=True), whole)
    first = sorted(tmp_path.glob("epoch=0*.ckpt"))
    assert len(first) == 1
    raw = torch.load(first[0], weights_only=True)  # BiP's state is plain tensors
    assert raw["callbacks"]["BiPCallback"]["bip"]["step"] == BATCHES
    resumed = Classifier(seed=5)  # other initial weights: everything must come from the checkpoint
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback]), resumed, ckpt_path=str(first[0]))
    assert callback.pruner is not None
    assert whole_callback.pruner is not None
    assert callback.pruner.step_count == whole_callback.pruner.step_count == BATCHES * EPOCHS
    assert_same_state(resumed.net, whole.net)
    # a checkpoint of another schedule is refused, naming the difference
    with pytest.raises(ValueError, match="steps: saved 8, here 12"):
        fit(trainer([BiPCallback(amount=AMOUNT)], max_epochs=3), Classifier(), ckpt_path=str(first[0]))


def test_lightning_resume_from_a_checkpoint_saved_after_fit_keeps_the_final_masks(tmp_path) -> None:
    """``trainer.save_checkpoint`` after fit, then ``fit(ckpt_path=...)`` with a new callback: BiP
    does not start again; training goes on with the finished run's masks fixed."""
    module = Classifier()
    finished = BiPCallback(amount=AMOUNT)
    first = trainer([finished])
    fit(first, module)
    path = tmp_path / "end.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["callbacks"]["BiPCallback"] == {"finished": True}
    masks = [module.net[i].weight_mask.clone() for i in (0, 2, 4)]
    resumed = Classifier(seed=5)
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], max_epochs=EPOCHS + 1), resumed, ckpt_path=str(path))
    assert callback.pruner is not None
    assert callback.pruner.step_count == 0  # no BiP step after the checkpoint
    assert callback.report is not None
    assert finished.report is not None
    assert callback.report.to_dict() == finished.report.to_dict()
    assert not any("scores" in k for k in resumed.state_dict())
    for i, mask in zip((0, 2, 4), masks, strict=True):
        assert torch.equal(resumed.net[i].weight_mask, mask)
        assert bool((resumed.net[i].weight[mask == 0] == 0).all())
    trained = [not torch.equal(resumed.net[i].weight_orig, module.net[i].weight_orig) for i in (0, 2, 4)]
    assert any(trained)  # the extra epoch trained the kept weights


def test_lightning_resume_from_a_checkpoint_without_bip_state_is_an_error(tmp_path) -> None:
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(trainer([BiPCallback(amount=AMOUNT), checkpoint], enable_checkpointing=True), Classifier())
    path = sorted(tmp_path.glob("epoch=0*.ckpt"))[0]
    raw = torch.load(path, weights_only=True)
    del raw["callbacks"]["BiPCallback"]
    torch.save(raw, path)
    with pytest.raises(RuntimeError, match=r"holds no BiPCallback state"):
        fit(trainer([BiPCallback(amount=AMOUNT)]), Classifier(), ckpt_path=str(path))


def test_lightning_bfloat16_mixed_precision() -> None:
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], precision="bf16-mixed"), module)
    assert callback.pruner is not None
    assert callback.pruner.step_count + callback.pruner.skipped_steps == BATCHES * EPOCHS
    masks = [module.net[i].weight_mask for i in (0, 2, 4)]
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)
    assert all(bool(torch.isfinite(module.net[i].weight).all()) for i in (0, 2, 4))


def assert_same_as_own_float16_loop(
    callback: BiPCallback, module: Classifier, optimizer_of: Any, init_scale: float
) -> None:
    """The oracle of the loss-scaler tests: the same BiP in a plain float16 loop with a GradScaler
    (``pruner.step(scaler=...)``) skips the same steps and ends with the same state."""
    net = make_net()
    pruner = torchbip.BiP(net, AMOUNT, steps=BATCHES * EPOCHS)
    optimizer = optimizer_of(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for _ in range(EPOCHS):
        for x, y in loader():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            pruner.step(scaler=scaler)
            scaler.update()
    pruner.finish()
    assert callback.pruner is not None
    assert callback.pruner.skipped_steps == pruner.skipped_steps > 0
    assert callback.pruner.step_count == pruner.step_count > 0
    assert_same_state(module.net, net)


def test_lightning_float16_grad_scaler_equals_own_loop_and_skips_overflows() -> None:
    """float16 autocast with a GradScaler whose first scales overflow: Lightning's run equals a plain
    loop with ``pruner.step(scaler=...)``, skipped steps included."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    init_scale = 2.0**22  # large enough that the first steps overflow in float16
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    fit(trainer([callback], plugins=[plugin]), module)

    assert_same_as_own_float16_loop(callback, module, make_optimizer, init_scale)


def test_lightning_gradient_clipping_does_not_change_bip_gradient() -> None:
    """BiP's upper gradient comes from the loss, not from the clipped .grad: masks equal the oracle's
    when the weights' clipping is a no-op, and the run completes with exact sparsity otherwise."""
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], gradient_clip_val=1e6), module)
    net, _ = own_loop()
    assert_same_state(module.net, net)


def test_lightning_generator_settings_are_read_once_and_equal_the_list_form() -> None:
    """``exclude`` and ``parameters`` given as generators: the callback checks its settings before it
    builds BiP, and both see every item (the last layer stays dense, as with a list)."""
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT, exclude=(p for p in ["net.4"]))
    fit(trainer([callback], max_epochs=1), module)
    assert callback.pruner is not None
    assert callback.pruner.names == ["net.0.weight", "net.2.weight"]
    assert not prune.is_pruned(module.net[4])
    layers = [module.net[0], module.net[2]]
    other = Classifier()
    chosen = BiPCallback(amount=AMOUNT, parameters=((m, "weight") for m in [other.net[0], other.net[2]]))
    fit(trainer([chosen], max_epochs=1), other)
    assert chosen.pruner is not None
    assert chosen.pruner.names == ["net.0.weight", "net.2.weight"]
    net = make_net()
    pruner = torchbip.BiP(net, AMOUNT, exclude=["4"], steps=BATCHES)
    optimizer = make_optimizer(net.parameters())
    for x, y in loader():
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    pruner.finish()
    assert_same_state(module.net, net)
    assert_same_state(other.net, net)
    assert all(int((m.weight == 0).sum()) > 0 for m in layers)


def test_lightning_bad_settings_name_the_argument_and_leave_the_model() -> None:
    with pytest.raises(TypeError, match="upper_rate"):
        BiPCallback(amount=0.5, upper_rate=3.0)
    with pytest.raises(TypeError, match="remove"):
        BiPCallback(amount=0.5, remove="yes")
    module = Classifier()
    before = capture(module)
    with pytest.raises(ValueError, match="amount"):
        fit(trainer([BiPCallback(amount=1.5)]), module)
    assert_unchanged(before, module)
    module = Classifier()
    before = capture(module)
    with pytest.raises(ValueError, match="exclude"):
        fit(trainer([BiPCallback(amount=0.5, exclude=["net.9"])]), module)
    assert_unchanged(before, module)


def test_lightning_validation_and_training_step_returning_none() -> None:
    class Skipping(Classifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                return None  # Lightning skips the backward pass and the optimizer step
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    module = Skipping()
    callback = BiPCallback(amount=AMOUNT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([callback]).fit(module, loader(), loader())
    assert callback.pruner is not None
    assert callback.pruner.step_count == (BATCHES - 1) * EPOCHS


def test_lightning_copy_of_callback_is_independent() -> None:
    callback = BiPCallback(amount=AMOUNT, upper_lr=5.0)
    twin = copy.deepcopy(callback)
    fit(trainer([callback]), Classifier())
    assert twin.pruner is None
    assert callback.pruner is not None
    assert callback.pruner.settings["upper_lr"] == 5.0


class DoubleClassifier(Classifier):
    """Lightning's ``precision="64-true"`` converts the module; the batches are converted here."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x.double()), y)


def test_lightning_true_precision_converts_the_module_before_bip_and_equals_own_loop() -> None:
    """``precision="64-true"`` converts the module (``.double()``), which would replace BiP's mask
    buffers after construction: the callback converts it first, so BiP prunes what trains."""
    module = DoubleClassifier()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], precision="64-true"), module)
    net, _ = own_loop(dtype=torch.float64)
    assert callback.pruner is not None
    assert callback.pruner.step_count == BATCHES * EPOCHS
    assert module.net[0].weight_mask.dtype == torch.float64
    assert_same_state(module.net, net)


def test_lightning_bf16_true_precision_keeps_exact_sparsity() -> None:
    class Bf16(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x.bfloat16()), y)

    module = Bf16()
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback], precision="bf16-true"), module)
    assert callback.pruner is not None
    assert callback.pruner.step_count == BATCHES * EPOCHS
    masks = [module.net[i].weight_mask for i in (0, 2, 4)]
    assert masks[0].dtype == torch.bfloat16
    assert callback.pruner.flat_scores.dtype == torch.float32  # scores of low-precision weights
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)


def test_lightning_second_fit_after_remove_trains_with_the_masks_fixed_and_removes_again() -> None:
    module = Classifier()
    callback = BiPCallback(amount=AMOUNT, remove=True)
    fit(trainer([callback]), module)
    zeros = [module.net[i].weight == 0 for i in (0, 2, 4)]
    before = [module.net[i].weight.detach().clone() for i in (0, 2, 4)]
    with pytest.warns(UserWarning, match="trains it with the masks fixed"):
        trainer([callback], max_epochs=1).fit(module, loader())
    assert not prune.is_pruned(module)  # removed again at the end
    for i, zero, old in zip((0, 2, 4), zeros, before, strict=True):
        weight = module.net[i].weight
        assert torch.equal(weight == 0, zero)  # the pruned entries stayed at zero
        assert not torch.equal(weight, old)  # the kept ones trained
    other = Classifier(seed=2)
    with pytest.raises(RuntimeError, match=r"already pruned another model; it prunes one model"):
        trainer([callback], max_epochs=1).fit(other, loader())
    assert not prune.is_pruned(other)


def test_lightning_resume_from_a_checkpoint_saved_after_fit_with_remove(tmp_path) -> None:
    """The checkpoint holds plain weights (``remove=True``): the masks are read off their zeros,
    training goes on with them fixed, and ``remove=True`` makes them permanent again."""
    module = Classifier()
    first = trainer([BiPCallback(amount=AMOUNT, remove=True)])
    fit(first, module)
    path = tmp_path / "end.ckpt"
    first.save_checkpoint(path)
    zeros = [module.net[i].weight == 0 for i in (0, 2, 4)]
    for remove in (True, False):
        resumed = Classifier(seed=5)
        callback = BiPCallback(amount=AMOUNT, remove=remove)
        fit(trainer([callback], max_epochs=EPOCHS + 1), resumed, ckpt_path=str(path))
        assert callback.pruner is not None
        assert callback.pruner.step_count == 0
        assert prune.is_pruned(resumed) is not remove
        for i, zero in zip((0, 2, 4), zeros, strict=True):
            assert torch.equal(resumed.net[i].weight == 0, zero)
        assert not torch.equal(resumed.net[0].weight, module.net[0].weight)  # the extra epoch trained


def test_lightning_backward_passes_in_validation_do_not_reach_bip() -> None:
    class Probing(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            with torch.enable_grad():  # e.g. input gradients for a saliency metric
                F.cross_entropy(self(x), y).backward()
            self.zero_grad()

    module = Probing()
    callback = BiPCallback(amount=AMOUNT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([callback], inference_mode=False, val_check_interval=1).fit(module, loader(), loader())
    net, _ = own_loop()
    assert_same_state(module.net, net)


def test_lightning_refused_settings_leave_the_module_unconverted() -> None:
    """BiP's checks run before the callback converts the module to ``"64-true"``: a refused
    ``fit`` leaves its dtype, values and hooks as they were."""
    module = DoubleClassifier()
    before = capture(module)
    with pytest.raises(ValueError, match=r"amount=1\.5 is a float outside \[0, 1\]"):
        fit(trainer([BiPCallback(amount=1.5)], precision="64-true"), module)
    assert module.net[0].weight.dtype == torch.float32
    assert_unchanged(before, module)
    assert not prune.is_pruned(module)


def test_lightning_coupled_example_inputs_in_the_trainer_s_precision() -> None:
    """Example inputs made for the ``"64-true"`` run work although BiP's checks run on the module
    before the trainer converts it."""
    pytest.importorskip("torch_pruning")
    module = DoubleClassifier()
    layout = torchbip.Coupled(torch.randn(4, 8, dtype=torch.float64))
    callback = BiPCallback(amount=0.5, layout=layout)
    fit(trainer([callback], precision="64-true"), module)
    assert callback.pruner is not None
    assert callback.pruner.step_count == BATCHES * EPOCHS
    assert module.net[0].weight_mask.dtype == torch.float64


class LateClassifier(Classifier):
    """Builds part of its network in ``setup`` and the rest in ``configure_model``."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.net: nn.Module | None = None
        self.late: nn.Module | None = None

    def setup(self, stage: str) -> None:
        if self.net is None:
            full = make_net()
            self.net = full[:2]
            self.late = full[2:]

    def configure_model(self) -> None:
        assert self.net is not None  # setup ran first
        if self.late is not None:
            self.net = nn.Sequential(*self.net, *self.late)
            self.late = None


def test_lightning_prunes_layers_made_in_setup_and_configure_model() -> None:
    module, callback = LateClassifier(), BiPCallback(amount=AMOUNT)
    fit(trainer([callback]), module)
    reference, ref_pruner = own_loop()  # the same network built in __init__
    assert callback.pruner is not None
    assert callback.pruner.names == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert callback.pruner.names == [f"net.{n}" for n in ref_pruner.names]
    assert_same_state(module.net, reference)
    assert "configure_model" not in vars(module)  # the module's own hook again


def test_lightning_refused_checkpoint_leaves_the_module_unpruned_and_a_retry_works(tmp_path) -> None:
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(trainer([BiPCallback(amount=AMOUNT), checkpoint], enable_checkpointing=True), Classifier())
    path = sorted(tmp_path.glob("epoch=0*.ckpt"))[0]
    module = Classifier(seed=4)
    params = dict(module.named_parameters())
    with pytest.raises(ValueError, match=r"other settings \(steps: saved 8, here 12\)"):
        fit(trainer([BiPCallback(amount=AMOUNT)], max_epochs=3), module, ckpt_path=str(path))
    assert not prune.is_pruned(module)
    assert dict(module.named_parameters()).keys() == params.keys()
    assert all(module.get_parameter(n) is p for n, p in params.items())  # the same Parameters
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback]), module, ckpt_path=str(path))  # the saved run's length: it resumes
    assert callback.report is not None
    assert callback.report.global_sparsity == pytest.approx(AMOUNT, abs=1e-3)


def test_lightning_fit_that_trains_nothing_after_remove_leaves_plain_weights() -> None:
    module, callback = Classifier(), BiPCallback(amount=AMOUNT, remove=True)
    run = trainer([callback])
    fit(run, module)
    weights = [module.net[i].weight.detach().clone() for i in (0, 2, 4)]
    with pytest.warns(UserWarning, match="trains it with the masks fixed"):
        run.fit(module, loader())  # max_epochs reached: Lightning runs no training loop
    assert not prune.is_pruned(module)
    make_net().load_state_dict(module.net.state_dict(), strict=True)
    assert all(torch.equal(module.net[i].weight, w) for i, w in zip((0, 2, 4), weights, strict=True))


@pytest.mark.parametrize("remove", [False, True])
@pytest.mark.parametrize("saved", ["last", "step"])
def test_lightning_resume_from_the_last_step_s_checkpoint_ends_as_the_uninterrupted_run(
    tmp_path, saved: str, remove: bool
) -> None:
    """A checkpoint written at the run's last step (``ckpt_path="last"`` of a finished run, which
    holds the finished masks, or ``every_n_train_steps``, written before BiP ended): Lightning
    trains nothing and skips ``on_train_start`` and ``on_train_end``; the callback still restores
    the checkpoint's BiP state and ends BiP, and the module ends as the uninterrupted run's."""
    steps = BATCHES + 2  # ends inside the second epoch
    stop = {"max_steps": steps, "max_epochs": -1, "enable_checkpointing": True}

    def checkpoint() -> L.callbacks.ModelCheckpoint:
        if saved == "last":
            return L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        return L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, save_top_k=-1)

    whole, whole_callback = Classifier(), BiPCallback(amount=AMOUNT, remove=remove)
    fit(trainer([whole_callback, checkpoint()], **stop), whole)
    path = tmp_path / "last.ckpt" if saved == "last" else tmp_path / f"epoch=1-step={steps}.ckpt"
    raw = torch.load(path, weights_only=True)
    state = raw["callbacks"]["BiPCallback"]
    assert state == {"finished": True} if saved == "last" else state["bip"]["step"] == steps
    resumed, callback = Classifier(seed=5), BiPCallback(amount=AMOUNT, remove=remove)
    fit(
        trainer([callback, checkpoint()], **stop), resumed, ckpt_path="last" if saved == "last" else str(path)
    )
    assert callback.pruner is not None
    assert callback.pruner.finished
    assert callback.report is not None
    assert whole_callback.report is not None
    assert callback.report.to_dict() == whole_callback.report.to_dict()
    assert not any(hasattr(m, "weight_scores") for m in resumed.modules())  # no live BiP left
    assert prune.is_pruned(resumed) is not remove
    assert_same_state(resumed.net, whole.net)
    # the same checkpoint without the callback's state is refused, as when training starts
    del raw["callbacks"]["BiPCallback"]
    torch.save(raw, tmp_path / "plain.ckpt")
    module = Classifier(seed=6)
    before = capture(module)
    with pytest.raises(RuntimeError, match=r"holds no BiPCallback state"):
        fit(trainer([BiPCallback(amount=AMOUNT)], **stop), module, ckpt_path=str(tmp_path / "plain.ckpt"))
    assert not prune.is_pruned(module)
    assert not any(hasattr(m, "weight_scores") for m in module.modules())
    assert_unchanged(before, module)


@pytest.mark.parametrize("stop", [{"max_steps": 0}, {"max_epochs": 0}, {"limit_train_batches": 0}])
def test_lightning_fit_that_trains_nothing_ends_bip_with_its_initial_masks(stop: dict[str, int]) -> None:
    """No training loop at all: BiP took no step; it ends (no scores, no gradient capture, a report,
    ``remove`` applied) with the masks of a BiP finished after zero steps, and warns."""
    for remove in (False, True):
        module, callback = Classifier(), BiPCallback(amount=AMOUNT, remove=remove)
        with pytest.warns(UserWarning, match=r"this fit\(\) trained nothing"):
            trainer([callback], **stop).fit(module, loader())
        oracle = make_net()
        report = torchbip.BiP(oracle, AMOUNT).finish()  # zero steps: its initial selection
        if remove:
            for i in (0, 2, 4):
                prune.remove(oracle[i], "weight")
        assert callback.pruner is not None
        assert callback.pruner.finished
        assert callback.report is not None
        # (the report names the tensors relative to the LightningModule, "net.0.weight")
        assert list(callback.report.to_dict()["tensors"].values()) == list(
            report.to_dict()["tensors"].values()
        )
        assert not any(hasattr(m, "weight_scores") for m in module.modules())
        assert prune.is_pruned(module) is not remove
        assert_same_state(module.net, oracle)


class Evaluated(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


@pytest.mark.parametrize("ckpt", ["best", "last"])
def test_lightning_test_validate_predict_from_a_checkpoint_after_remove(tmp_path, ckpt: str) -> None:
    """``remove=True``, then Lightning's usual ``trainer.test()`` (``ckpt_path="best"`` by default),
    ``validate`` and ``predict`` with ``"best"`` or ``"last"``: the checkpoints were written in torch's
    pruned form during training and load into the plain module as ``weight_orig * weight_mask``."""
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="max", save_last=True)
    module, callback = Evaluated(), BiPCallback(amount=AMOUNT, remove=True)
    run = trainer([callback, checkpoint], enable_checkpointing=True, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, loader(), loader())
        path = checkpoint.best_model_path if ckpt == "best" else checkpoint.last_model_path
        raw = torch.load(path, weights_only=True)["state_dict"]
        run.test(dataloaders=loader(), **({} if ckpt == "best" else {"ckpt_path": ckpt}))
        assert not prune.is_pruned(module)
        for i in (0, 2, 4):
            expected = raw[f"net.{i}.weight_orig"] * raw[f"net.{i}.weight_mask"]
            assert torch.equal(module.net[i].weight, expected)
        run.validate(dataloaders=loader(), ckpt_path=ckpt)
        predictions = run.predict(dataloaders=loader(), ckpt_path=ckpt)
    masks = [raw[f"net.{i}.weight_mask"] for i in (0, 2, 4)]
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)
    assert sum(int((module.net[i].weight == 0).sum()) for i in (0, 2, 4)) == round(AMOUNT * total)
    oracle = make_net(seed=1)  # the unpruned architecture, given the checkpoint's weights by hand
    plain = {k.removeprefix("net."): v for k, v in raw.items() if not k.endswith(("_orig", "_mask"))}
    plain.update(
        {f"{i}.weight": raw[f"net.{i}.weight_orig"] * raw[f"net.{i}.weight_mask"] for i in (0, 2, 4)}
    )
    oracle.load_state_dict(plain, strict=True)
    assert predictions is not None
    x = torch.stack([x for x, _ in dataset()])
    torch.testing.assert_close(torch.cat(predictions), oracle(x), rtol=0, atol=0)


def test_lightning_strategy_that_starts_new_processes_is_refused() -> None:
    module = Classifier()
    run = trainer([BiPCallback(amount=AMOUNT)], strategy="ddp_fork", devices=1)
    with pytest.raises(Exception, match=r"runs fit\(\) in new processes"):
        fit(run, module)
    assert not prune.is_pruned(module)


class FailingSetup(Classifier):
    """Its setup fails once (after the callback's setup ran): a broken first fit()."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def setup(self, stage: str) -> None:
        if self.fail:
            self.fail = False
            raise RuntimeError("setup failed")


def test_lightning_fit_that_fails_before_training_leaves_nothing_behind() -> None:
    module = FailingSetup()
    before = capture(module)
    with pytest.raises(RuntimeError, match="setup failed"):
        fit(trainer([BiPCallback(amount=AMOUNT)]), module)
    assert "configure_model" not in vars(module)
    assert_unchanged(before, module)
    fit(trainer([]), module)  # a fit without the callback trains the module dense
    assert not prune.is_pruned(module)
    callback = BiPCallback(amount=AMOUNT)
    fit(trainer([callback]), module)
    assert callback.report is not None
    assert callback.report.global_sparsity == pytest.approx(AMOUNT, abs=1e-3)


class FailingValidation(Classifier):
    def validation_step(self, batch, batch_idx):
        raise RuntimeError("validation failed")


def test_lightning_sanity_check_failure_leaves_the_module_unpruned() -> None:
    module = FailingValidation()
    before = capture(module)
    run = trainer([BiPCallback(amount=AMOUNT)], num_sanity_val_steps=1)
    with pytest.raises(RuntimeError, match="validation failed"):
        fit(run, module, val_dataloaders=loader())
    assert not prune.is_pruned(module)
    assert_unchanged(before, module)


class CopiesItself(L.Callback):
    """Copies and pickles the module between BiPCallback's setup and configure_model."""

    def setup(self, trainer, pl_module, stage):
        self.copy = copy.deepcopy(pl_module)
        self.pickled = pickle.loads(pickle.dumps(pl_module))


def test_lightning_module_copied_before_configure_model_is_a_plain_module() -> None:
    module, callback, copier = Classifier(), BiPCallback(amount=AMOUNT), CopiesItself()
    fit(trainer([callback, copier]), module)
    assert prune.is_pruned(module)
    for other in (copier.copy, copier.pickled):
        other.configure_model()  # the module's own (a no-op), not BiP's build
        assert not prune.is_pruned(other)
    assert callback.pruner is not None
    assert callback.pruner.model is module


class SkipsEndOfWindow(Classifier):
    """Returns ``None`` for the last batch of every second accumulation window (``accumulate=2``)."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 3 else super().training_step(batch, batch_idx)


def test_lightning_loss_scaler_with_a_window_that_ends_in_none_equals_own_loop() -> None:
    """Under a GradScaler, Lightning skips the optimizer's step when the batch that ends an
    accumulation returns ``None`` (and zeroes the window's gradients before the next one): BiP
    neither steps nor keeps that window's gradients."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = SkipsEndOfWindow()
    callback = BiPCallback(amount=AMOUNT)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    fit(trainer([callback], plugins=[plugin], accumulate_grad_batches=2), module)

    net = make_net()
    pruner = torchbip.BiP(net, AMOUNT, steps=BATCHES * EPOCHS // 2)
    optimizer = make_optimizer(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(loader()):
            if i == 3:  # no backward pass, no step for the window: its gradients are dropped
                optimizer.zero_grad()
                pruner.zero_grad()
                continue
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y) / 2
            scaler.scale(loss).backward()
            if i == 1:
                scaler.step(optimizer)
                pruner.step(scaler=scaler)
                scaler.update()
                optimizer.zero_grad()
    pruner.finish()
    assert callback.pruner is not None
    assert callback.pruner.step_count == pruner.step_count == EPOCHS
    assert_same_state(module.net, net)


class FusedAdamW(Classifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


def test_lightning_loss_scaler_with_a_fused_optimizer_equals_own_loop_and_skips_overflows() -> None:
    """A fused optimizer unscales its gradients inside ``scaler.step`` (Lightning does not unscale
    before ``on_before_optimizer_step``): BiP reads the skip after the step, as a plain loop does."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    init_scale = 2.0**22  # the first steps overflow in float16
    module = FusedAdamW()
    callback = BiPCallback(amount=AMOUNT)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    fit(trainer([callback], plugins=[plugin]), module)

    assert_same_as_own_float16_loop(
        callback, module, lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True), init_scale
    )


def test_a_second_fit_of_the_same_callback_resumes_from_a_checkpoint_saved_after_remove(
    tmp_path: Any,
) -> None:
    """That checkpoint holds plain weights; the second fit keeps the masks their zeros give."""
    path = str(tmp_path / "after.ckpt")
    module, callback = Classifier(), BiPCallback(amount=0.8, remove=True)
    first = trainer([callback], max_epochs=1)
    fit(first, module)
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert "net.0.weight" in saved
    assert "net.0.weight_orig" not in saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(trainer([callback], max_epochs=2), module, ckpt_path=path)
    assert not prune.is_pruned(module)
    for i in (0, 2, 4):
        assert torch.equal(module.net[i].weight == 0, saved[f"net.{i}.weight"] == 0)  # the masks stayed fixed
