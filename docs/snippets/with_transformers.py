"""BiP inside the Hugging Face Trainer: one callback, the model and TrainingArguments unchanged."""

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from torchbip.integrations.transformers import BiPTrainerCallback

torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32)  # fmt: skip
model = BertForSequenceClassification(config)  # a small model built here: nothing is downloaded
ids = torch.randint(0, 100, (256, 16))
train = [{"input_ids": i, "labels": int(i[0] >= 50)} for i in ids]

bip = BiPTrainerCallback(amount=0.5, exclude=["classifier"], remove=True)
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(
        output_dir=out, num_train_epochs=2, per_device_train_batch_size=32, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train, callbacks=[bip]).train()
    print(bip.report)  # half of the encoder's and pooler's nn.Linear weights (ranked together) is zero
    model.save_pretrained(f"{out}/pruned")  # plain keys (remove=True): loads into a dense model
    reloaded = BertForSequenceClassification.from_pretrained(f"{out}/pruned")
assert torch.equal(reloaded.bert.encoder.layer[0].attention.self.query.weight,
                   model.bert.encoder.layer[0].attention.self.query.weight)  # fmt: skip
