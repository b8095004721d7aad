"""Structured BiP over coupled channels: the export removes them all."""

import torch
import torch.nn.functional as F
import torchvision

import torchbip

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
example = torch.randn(2, 3, 32, 32)  # traces the dependency graph, counts MACs

# One score per coupled channel: a conv's filter with its BatchNorm
# channel, every consumer's input channel and every layer a residual
# addition ties to it.
pruner = torchbip.BiP(
    model, amount=0.5, layout=torchbip.Coupled(example), steps=4
)
print(len(pruner.layout.groups), "groups; left dense:", pruner.layout.skipped)

optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for _ in range(4):  # your training loop, with your data
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    pruner.step()
pruner.finish()

# A pruned channel is exactly zero everywhere: the export removes all.
slim = torchbip.export_slim(model.eval(), example)
print(
    slim.layer1[0].conv1.out_channels, slim.layer4[1].conv2.out_channels
)  # 32 256
with torch.no_grad():
    torch.testing.assert_close(slim(example), model(example))

# Budget by MACs: remove half of the conv and linear layers' MACs.
other = torchvision.models.resnet18(num_classes=10)
by_macs = torchbip.BiP(
    other, amount=0.5, layout=torchbip.Coupled(example, budget="macs")
)
layout = by_macs.layout
share = (
    layout.macs(layout.group_keeps(by_macs.score_views)) / layout.dense_macs
)
print(f"{share:.3f} of the MACs kept")
