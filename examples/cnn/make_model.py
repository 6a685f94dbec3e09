"""Writes the CNN example's weights and data: a PyTorch CNN on 3x32x32 images, two outputs.

python examples/cnn/make_model.py          # writes model.pt, calib.npz, val.npz here
tandem models build --spec examples/cnn/model.toml --out zoo/

The images are scikit-learn's handwritten digits (shipped with the package, no download),
upsampled from 8x8 to 32x32 and tinted with a random colour per image, so the model sees
3-channel images as a real image classifier would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallnet.model import make_model


def images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 [N, 3, 32, 32] in [0, 1], and their labels."""
    digits = load_digits()
    gray = digits.images.astype(np.float32) / 16.0  # [N, 8, 8]
    big = np.kron(gray, np.ones((4, 4), np.float32))  # [N, 32, 32], nearest upsampling
    colours = np.random.default_rng(seed).uniform(0.3, 1.0, size=(len(big), 3, 1, 1))
    return (big[:, None] * colours).astype(np.float32), digits.target.astype(np.int64)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, lr: float = 3e-3
) -> None:
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            logits, _ = model(xs[batch])
            nn.functional.cross_entropy(logits, ys[batch]).backward()
            optimiser.step()
    model.eval()


def main(folder: Path, epochs: int = 2) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x, y = images()
    order = np.random.default_rng(1).permutation(len(x))
    train_idx, val_idx = order[:1400], order[1400:]
    model = make_model()
    train(model, x[train_idx], y[train_idx], epochs)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    np.savez(folder / "calib.npz", pixels=x[train_idx[:128]])
    np.savez(folder / "val.npz", pixels=x[val_idx], labels=y[val_idx])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
