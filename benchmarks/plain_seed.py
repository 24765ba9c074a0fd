"""DESIGN.md's seed_hybrid written directly in plain PyTorch: the reference kiln is compared with,
in parameter count (tests) and in speed (benchmarks)."""

import torch
from torch import nn


class PlainSeedHybrid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.dense = nn.Linear(13 * 32, 64)
        self.lstm = nn.LSTM(64, 50, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(50, 2, 100, dropout=0.0, batch_first=True)
        self.head = nn.Linear(50, 10)

    def forward(self, x):  # (B, 1, 28, 28) floats in [0, 1]
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)  # (B, 32, 13, 13)
        x = x.permute(0, 2, 3, 1).flatten(2)  # (B, 13, 416): one step per image row
        x, _ = self.lstm(torch.relu(self.dense(x)))
        return self.head(self.encoder(x).mean(1))
