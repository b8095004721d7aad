"""``BiPTrainerCallback`` inside a real ``transformers.Trainer`` on the CPU.

Oracles: the same BiP in a plain loop over the batches the trainer drew (masks and weights must
be equal), exact counts of zeros, a strict ``load_state_dict`` into a fresh model after
``prune.remove``, and an uninterrupted run for resume.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from torchbip.integrations.transformers import STATE_FILE, BiPTrainerCallback  # noqa: E402

AMOUNT = 0.5
SAMPLES, BATCH, EPOCHS = 64, 16, 2
STEPS = SAMPLES // BATCH * EPOCHS


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def dataset() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (SAMPLES, 8), generator=g)
    labels = (ids[:, 0] >= 32).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


class Recorder:
    """A data collator that keeps every batch the trainer draws."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Tensor]] = []

    def __call__(self, features: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = {k: torch.stack([f[k] for f in features]) for k in features[0]}
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def run(model: nn.Module, callback: BiPTrainerCallback, out, resume=None, collator=None, **kwargs):
    options = {
        "output_dir": str(out), "per_device_train_batch_size": BATCH, "num_train_epochs": EPOCHS,
        "report_to": [], "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no",
        "save_strategy": "no", "seed": 0,
    }  # fmt: skip
    options.update(kwargs)
    args = transformers.TrainingArguments(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=dataset(), callbacks=[callback], data_collator=collator
        )
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def linear_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def test_trainer_equals_own_loop(tmp_path) -> None:
    """The trainer's AdamW, linear schedule and clipping, replayed by hand with BiP's three lines."""
    model = tiny_bert()
    callback = BiPTrainerCallback(amount=AMOUNT)
    recorder = Recorder()
    run(model, callback, tmp_path, collator=recorder, learning_rate=1e-3, max_grad_norm=1.0)
    assert callback.pruner is not None
    assert callback.pruner.step_count == STEPS == callback.pruner.steps
    assert len(recorder.batches) == STEPS

    oracle = tiny_bert()
    pruner = torchbip.BiP(oracle, AMOUNT, steps=STEPS)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    oracle.train()
    for batch in recorder.batches:
        oracle(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(oracle.parameters(), 1.0)
        optimizer.step()
        pruner.step()
        schedule.step()
        optimizer.zero_grad()
    pruner.finish()
    mine, theirs = model.state_dict(), oracle.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], msg=key)
    for a, b in zip(linear_weights(model), linear_weights(oracle), strict=True):
        assert torch.equal(a == 0, b == 0)


def test_trainer_exact_sparsity_and_strict_reload_after_remove(tmp_path) -> None:
    model = tiny_bert()
    callback = BiPTrainerCallback(amount=AMOUNT, remove=True, exclude=["classifier"])
    run(model, callback, tmp_path)
    assert not prune.is_pruned(model)
    weights = linear_weights(model)[:-1]  # the classifier is excluded
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(AMOUNT * total)
    assert int((model.classifier.weight == 0).sum()) == 0
    model.save_pretrained(tmp_path / "pruned")
    fresh = tiny_bert(seed=3)
    fresh.load_state_dict(model.state_dict(), strict=True)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "pruned")
    ids = torch.randint(0, 64, (3, 8))
    model.eval(), fresh.eval(), reloaded.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_trainer_checkpoint_written_during_training_loads_into_the_model_after_remove(tmp_path) -> None:
    """The checkpoints were written in torch's pruned form; after ``remove=True`` one loads strictly
    into the plain model as ``weight = weight_orig * weight_mask``."""
    from safetensors.torch import load_file

    model = tiny_bert()
    run(model, BiPTrainerCallback(amount=AMOUNT, remove=True), tmp_path, save_strategy="steps", save_steps=2)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    model.load_state_dict(saved, strict=True)
    assert not prune.is_pruned(model)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    masks = [saved[f"{name}.weight_mask"] for name in names]
    for name, weight, mask in zip(names, linear_weights(model), masks, strict=True):
        assert torch.equal(weight, saved[f"{name}.weight_orig"] * mask)
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)


def test_trainer_gradient_accumulation_steps_once_per_optimizer_step(tmp_path) -> None:
    model = tiny_bert()
    callback = BiPTrainerCallback(amount=AMOUNT)
    run(model, callback, tmp_path, gradient_accumulation_steps=2)
    assert callback.pruner is not None
    assert callback.pruner.step_count == STEPS // 2 == callback.pruner.steps
    masks = [m.weight_mask for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)


def test_trainer_resume_from_checkpoint_equals_uninterrupted(tmp_path) -> None:
    whole = tiny_bert()
    run(
        whole, BiPTrainerCallback(amount=AMOUNT), tmp_path / "a", save_strategy="steps", save_steps=STEPS // 2
    )
    half = tmp_path / "a" / f"checkpoint-{STEPS // 2}"
    assert (half / STATE_FILE).is_file()
    assert torch.load(half / STATE_FILE, weights_only=True)["step"] == STEPS // 2
    # resume in a fresh output folder holding only the first checkpoint
    shutil.copytree(half, tmp_path / "b" / half.name)
    resumed = tiny_bert(seed=4)
    callback = BiPTrainerCallback(amount=AMOUNT)
    run(resumed, callback, tmp_path / "b", resume=True)
    assert callback.pruner is not None
    assert callback.pruner.step_count == STEPS
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)


def test_trainer_resume_from_the_last_step_s_checkpoint_equals_uninterrupted(tmp_path) -> None:
    """``max_steps`` that ends inside an epoch, resumed from the checkpoint of its last step (a
    re-launched finished job): the trainer runs one more optimizer step (learning rate 0 under its
    linear schedule); BiP takes no upper step past ``max_steps``, so the end is the uninterrupted
    run's."""
    steps = SAMPLES // BATCH + 2
    options = {"max_steps": steps, "save_strategy": "steps", "save_steps": steps}
    whole = tiny_bert()
    run(whole, BiPTrainerCallback(amount=AMOUNT), tmp_path, **options)
    assert torch.load(tmp_path / f"checkpoint-{steps}" / STATE_FILE, weights_only=True)["step"] == steps
    resumed, callback = tiny_bert(seed=4), BiPTrainerCallback(amount=AMOUNT)
    trainer = run(resumed, callback, tmp_path, resume=True, **options)
    assert callback.pruner is not None
    assert callback.pruner.step_count == steps
    assert callback.pruner.skipped_steps == trainer.state.global_step - steps  # the trainer's extra step
    _assert_same_state(whole, resumed)


def test_trainer_resume_reads_the_folder_passed_to_train_not_output_dir(tmp_path) -> None:
    """``trainer.train(resume_from_checkpoint=folder)`` from another output_dir: BiP's state is read
    from ``folder``, also when the new output_dir holds another run's checkpoint of the same step."""
    whole = tiny_bert()
    half = STEPS // 2
    run(whole, BiPTrainerCallback(amount=AMOUNT), tmp_path / "a", save_strategy="steps", save_steps=half)
    folder = tmp_path / "a" / f"checkpoint-{half}"
    # another run (another initialisation) leaves checkpoint-<half> in output folder "b"
    run(tiny_bert(seed=7), BiPTrainerCallback(amount=AMOUNT), tmp_path / "b", save_strategy="steps",
        save_steps=half)  # fmt: skip
    for out in ("b", "c"):  # "c": a fresh output folder
        resumed = tiny_bert(seed=4)
        callback = BiPTrainerCallback(amount=AMOUNT)
        run(resumed, callback, tmp_path / out, resume=str(folder))
        assert callback.pruner is not None
        assert callback.pruner.step_count == STEPS
        _assert_same_state(whole, resumed)


def test_trainer_resume_refuses_another_run_s_bip_state(tmp_path) -> None:
    """A checkpoint folder whose BiP state belongs to another run is an error, not a silent mix."""
    half = STEPS // 2
    run(
        tiny_bert(), BiPTrainerCallback(amount=AMOUNT), tmp_path / "a", save_strategy="steps", save_steps=half
    )
    run(tiny_bert(seed=7), BiPTrainerCallback(amount=AMOUNT), tmp_path / "b", save_strategy="steps",
        save_steps=half)  # fmt: skip
    folder = tmp_path / "a" / f"checkpoint-{half}"
    shutil.copy(tmp_path / "b" / f"checkpoint-{half}" / STATE_FILE, folder / STATE_FILE)
    with pytest.raises(
        RuntimeError, match=r"does not match the model the trainer loaded from its checkpoint"
    ):
        run(tiny_bert(seed=4), BiPTrainerCallback(amount=AMOUNT), tmp_path / "c", resume=str(folder))


def test_trainer_resume_without_bip_state_is_an_error(tmp_path) -> None:
    run(
        tiny_bert(), BiPTrainerCallback(amount=AMOUNT), tmp_path, save_strategy="steps", save_steps=STEPS // 2
    )
    (tmp_path / f"checkpoint-{STEPS // 2}" / STATE_FILE).unlink()
    (tmp_path / f"checkpoint-{STEPS}" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        run(tiny_bert(), BiPTrainerCallback(amount=AMOUNT), tmp_path, resume=True)


def test_trainer_plain_module_and_bad_settings(tmp_path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 8)
            self.head = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

        def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
            logits = self.head(self.embed(input_ids).mean(1))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    net = Net()
    callback = BiPTrainerCallback(amount=0.75)
    run(net, callback, tmp_path, save_strategy="steps", save_steps=STEPS)
    assert callback.report is not None
    assert callback.report.global_sparsity == 0.75
    assert callback.pruner is not None
    assert callback.pruner.names == ["head.0.weight", "head.2.weight"]
    with pytest.raises(TypeError, match="upper_rate"):
        BiPTrainerCallback(amount=0.5, upper_rate=3.0)
    model = tiny_bert()
    before = capture(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "bad"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="amount"):
        transformers.Trainer(model=model, args=args, callbacks=[BiPTrainerCallback(amount=-0.1)])
    assert_unchanged(before, model)


def _trainer(callback: BiPTrainerCallback, out, model=None, model_init=None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, report_to=[],
        use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Trainer(
            model=model, model_init=model_init, args=args, train_dataset=dataset(), callbacks=[callback]
        )


def test_trainer_model_init_prunes_the_model_that_trains(tmp_path) -> None:
    """``train()`` calls ``model_init`` again: BiP moves to that model, which trains pruned."""
    made: list[nn.Module] = []

    def model_init() -> nn.Module:
        made.append(tiny_bert())
        return made[-1]

    callback = BiPTrainerCallback(amount=AMOUNT)
    trainer = _trainer(callback, tmp_path, model_init=model_init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(made) == 2
    assert trainer.model is made[-1]
    assert callback.pruner is not None
    assert callback.pruner.model is made[-1]
    assert callback.pruner.step_count == SAMPLES // BATCH
    assert prune.is_pruned(made[-1])
    weights = [m.weight for m in made[-1].modules() if isinstance(m, nn.Linear) and prune.is_pruned(m)]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(AMOUNT * total)
    assert not any(hasattr(m, "weight_scores") for m in made[0].modules())  # the dropped model, released


def test_trainer_second_train_after_remove_keeps_the_masks_fixed(tmp_path) -> None:
    model = tiny_bert()
    callback = BiPTrainerCallback(amount=AMOUNT, remove=True)
    trainer = _trainer(callback, tmp_path, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    zeros = [w == 0 for w in linear_weights(model)]
    with pytest.warns(UserWarning, match=r"this train\(\) trains it with the masks fixed"):
        trainer.train()
    assert not prune.is_pruned(model)
    assert all(torch.equal(w == 0, z) for w, z in zip(linear_weights(model), zeros, strict=True))
    other = _trainer(callback, tmp_path, model=tiny_bert(seed=1))
    with pytest.raises(RuntimeError, match=r"already pruned another model"):
        other.train()


def test_trainer_load_best_model_at_end_leaves_the_best_checkpoint_s_model(tmp_path) -> None:
    """``load_best_model_at_end``: the trainer loads the best checkpoint before ``on_train_end``; the
    final model is that checkpoint's model exactly (masks, and ``weight_orig`` at pruned entries),
    not its kept weights with the last step's values put back at the pruned ones."""
    from safetensors.torch import load_file

    model = tiny_bert()
    callback = BiPTrainerCallback(amount=AMOUNT)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, report_to=[],
        use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the highest evaluation loss: an early checkpoint
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=dataset(), eval_dataset=dataset()[:32], callbacks=[callback]
        )
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert not best.endswith(f"checkpoint-{STEPS}")  # the best is not the last step's model
    saved = load_file(f"{best}/model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for key in saved:
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0, msg=key)
    masks = [m.weight_mask for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(AMOUNT * total)
    assert callback.report is not None
    assert callback.report.global_sparsity == round(AMOUNT * total) / total
    assert callback.pruner is not None
    assert callback.pruner.step_count == int(best.rsplit("-", 1)[1])


# -- the load hook a finish with remove=True leaves on the model ---------------------------------


def _finished_with_remove() -> tuple[nn.Module, dict[str, Tensor]]:
    """A model the callback finished with ``remove=True``, and a state written during training."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    callback = BiPTrainerCallback(amount=0.5, remove=True)
    callback.on_init_end(None, None, None, model=model)
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
    args = SimpleNamespace(load_best_model_at_end=False)
    callback.on_train_end(args, SimpleNamespace(best_model_checkpoint=None), None, model=model)
    assert not prune.is_pruned(model)
    return model, pruned_state


def test_a_model_after_remove_pickles_as_torch_s_own_pruned_and_removed_model_does() -> None:
    import io

    model, _ = _finished_with_remove()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # (torch's own prune + remove leaves a module that pickles)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_copy_pruned_again_loads_a_pruned_checkpoint_by_its_own_layers() -> None:
    """The hook looks at the module it is called for: a copy put in torch's pruned form again (to
    fine-tune with fixed masks) loads a checkpoint in that form as it is."""
    import copy

    model, pruned_state = _finished_with_remove()
    twin = copy.deepcopy(model)
    for i in (0, 2):
        prune.custom_from_mask(twin[i], "weight", twin[i].weight != 0)
    twin.load_state_dict(pruned_state)
    for i in (0, 2):
        assert torch.equal(twin[i].weight_orig, pruned_state[f"{i}.weight_orig"])
        assert torch.equal(twin[i].weight_mask, pruned_state[f"{i}.weight_mask"])
