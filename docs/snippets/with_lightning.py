"""BiP inside PyTorch Lightning: one callback, the LightningModule unchanged."""

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from torchbip.integrations.lightning import BiPCallback


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


torch.manual_seed(0)
x = torch.randn(512, 8, 8)
y = (x.flatten(1)[:, :10].argmax(1)).long()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)

bip = BiPCallback(amount=0.9, exclude=["net.3"], remove=True)  # keep the classifier dense
trainer = L.Trainer(
    max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=1.0, precision="bf16-mixed",
    callbacks=[bip], logger=False, enable_checkpointing=False, enable_progress_bar=False,
)  # fmt: skip
module = Classifier()
trainer.fit(module, loader)

print(bip.report)  # 90% of net.1.weight is zero
assert not prune.is_pruned(module)  # remove=True: plain, sparse weights
assert abs(float((module.net[1].weight == 0).float().mean()) - 0.9) < 1e-3
