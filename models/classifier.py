"""The domain classifier: a small CNN trained once on the real, balanced training split.

It plays two parts. Its penultimate layer is the feature space for FID, KID, precision and recall (an
offline stand-in for Inception on 8x8 digits), and its predictions label generated images, which gives the
minority share and per-class FID of unconditional samples (paper §5.1, App. I).
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn


class DomainClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: tuple[int, int] = (32, 64),
                 feature_dim: int = 64):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes,
                       "channels": list(channels), "feature_dim": feature_dim}
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # any input size (8x8 digits, 28x28 MNIST, 32x32 CIFAR) -> 2x2
            nn.Flatten(),
            nn.Linear(4 * c2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, batch_size: int,
                     lr: float, seed: int, channels=(32, 64), feature_dim: int = 64,
                     device: str | torch.device = "cpu") -> DomainClassifier:
    """Cross-entropy training on images x in [0, 1], shape [N, C, H, W], with integer labels y."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DomainClassifier(x.shape[1], num_classes, tuple(channels), feature_dim).to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    labels = torch.as_tensor(y, dtype=torch.long, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        for start in range(0, len(data) - 1, batch_size):  # -1: never a batch of one (batchnorm)
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(data[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: DomainClassifier, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Predicted class of each image in x (float in [0, 1], [N, C, H, W])."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32, device=device)).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def save_classifier(model: DomainClassifier, path, extra: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(model.config), **(extra or {})})


def load_classifier(path, device: str | torch.device = "cpu") -> DomainClassifier:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = DomainClassifier(config["in_channels"], config["num_classes"], tuple(config["channels"]),
                             config["feature_dim"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
