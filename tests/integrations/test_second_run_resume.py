"""A second ``fit()``/``train()`` of a finished callback, resumed from a checkpoint written mid-run.

The checkpoint holds the BiP state of the unfinished first run (step 2). The callback finished,
so that state is not resumed: the model trains with the masks of the checkpoint it loaded, a
warning names the checkpoint, and ``callback.report`` describes the model at the end.

Oracles: the masks stored in the checkpoint file itself, the budget's count of zeros
(``round(amount * n)``, counted in the weights) and the per-tensor zeros counted in the model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

pytestmark = pytest.mark.usefixtures("one_thread")


def zeros(layers: list[nn.Module]) -> list[int]:
    return [int((layer.weight == 0).sum()) for layer in layers]


def assert_trained_with(
    layers: list[nn.Module], masks: list[Tensor], budget: int, report_zeros: list[int]
) -> None:
    """The layers' non-zeros are exactly ``masks``; the budget's zeros; the report counts them."""
    for layer, keep in zip(layers, masks, strict=True):
        assert torch.equal(layer.weight != 0, keep)
    assert sum(zeros(layers)) == budget
    assert report_zeros == zeros(layers)


def not_resumed(caught: list[warnings.WarningMessage], checkpoint: str) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if checkpoint in str(w.message) and "BiP state" in str(w.message) and "not resumed" in str(w.message)
    ]


# -- Lightning ----------------------------------------------------------------------------------


def lightning_fit(L, callbacks, module, ckpt_path=None, **kwargs) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=16)
    options = {
        "max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "deterministic": True,
    }  # fmt: skip
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, loader, ckpt_path=ckpt_path)


@pytest.mark.parametrize("remove", [False, True])
def test_lightning_second_fit_from_a_mid_run_checkpoint_trains_its_masks_and_warns(tmp_path, remove) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from torchbip.integrations.lightning import BiPCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    module, callback = Classifier(), BiPCallback(amount=0.8, remove=remove)
    every_2 = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2, filename="{step}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_fit(L, [callback, every_2], module, enable_checkpointing=True)
    layers = [module.net[i] for i in (0, 2, 4)]
    final = [layer.weight != 0 for layer in layers]
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=True)["state_dict"]
    at_step_2 = [saved[f"net.{i}.weight_mask"] != 0 for i in (0, 2, 4)]
    assert not all(torch.equal(a, b) for a, b in zip(final, at_step_2, strict=True))  # (the case at hand)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_fit(L, [callback], module, ckpt_path=str(tmp_path / "step=2.ckpt"), max_epochs=3)

    assert callback.report is not None
    assert_trained_with(
        layers, at_step_2, round(0.8 * 816), [t.zeros for t in callback.report.tensors.values()]
    )
    assert prune.is_pruned(module) is not remove
    assert len(not_resumed(caught, "step=2.ckpt")) == 1, [str(w.message) for w in caught]


# -- Hugging Face -------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def hf_train(transformers, model, callback, out, epochs, save, resume=None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16, num_train_epochs=epochs, report_to=[],
        use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0, learning_rate=1e-2,
        save_strategy="steps" if save else "no", save_steps=2,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)


@pytest.mark.parametrize("remove", [False, True])
def test_hf_second_train_from_a_mid_run_checkpoint_trains_its_masks_and_warns(tmp_path, remove) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from torchbip.integrations.transformers import BiPTrainerCallback

    model, callback = Tiny(), BiPTrainerCallback(amount=0.5, remove=remove)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_train(transformers, model, callback, tmp_path / "a", 2, True)
    layers = [model.fc1, model.fc2, model.head]
    final = [layer.weight != 0 for layer in layers]
    saved = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    at_step_2 = [saved[f"{name}.weight_mask"] != 0 for name in ("fc1", "fc2", "head")]
    assert not all(torch.equal(a, b) for a, b in zip(final, at_step_2, strict=True))  # (the case at hand)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_train(
            transformers,
            model,
            callback,
            tmp_path / "b",
            3,
            False,
            resume=str(tmp_path / "a" / "checkpoint-2"),
        )

    assert callback.report is not None
    assert_trained_with(
        layers, at_step_2, round(0.5 * 816), [t.zeros for t in callback.report.tensors.values()]
    )
    assert prune.is_pruned(model) is not remove
    assert len(not_resumed(caught, "checkpoint-2")) == 1, [str(w.message) for w in caught]
