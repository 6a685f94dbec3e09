"""A small CNN on 3x32x32 images with two outputs: class logits and an embedding."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """conv-bn-relu-pool blocks (32 -> 4 pixels), then two heads on the 4x4 features."""

    def __init__(self, width: int = 16, classes: int = 10, embedding: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.embed = nn.Linear(4 * width * 16, embedding)
        self.classify = nn.Linear(embedding, classes)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.flatten(self.features(pixels), 1)
        embedding = torch.relu(self.embed(h))
        return self.classify(embedding), embedding


def make_model() -> nn.Module:
    """The factory the spec names: an untrained SmallNet; the build loads model.pt into it."""
    return SmallNet()
