"""The domain classifier: a small CNN trained once on the real, balanced training split.

It plays two parts. Its penultimate layer is the feature space for FID, KID, precision and recall (an
offline stand-in for Inception on 8x8 digits; for 28x28 digits a small residual network, closer to the paper's
ResNet-18 trained on MNIST), and its predictions label generated images, which gives the minority share and
per-class FID of unconditional samples (paper §5.1, App. I). An FID in these features is not an Inception FID:
the units differ (feature dimension and scale), so only FIDs computed with the same classifier compare.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batchnorm and a skip connection (a projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class DomainClassifier(nn.Module):
    """``cnn``: two conv layers pooled to 2x2 (8x8 digits). ``resnet``: a stem and three residual blocks (the
    second halving the resolution), globally pooled, ResNet-style (28x28 digits)."""

    def __init__(self, in_channels: int, num_classes: int, channels: tuple[int, int], feature_dim: int,
                 arch: str = "cnn"):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes,
                       "channels": list(channels), "feature_dim": feature_dim, "arch": arch}
        c1, c2 = channels
        if arch == "cnn":
            body = [nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                    nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(2),  # any input size (8x8 digits, 28x28 MNIST, 32x32 CIFAR) -> 2x2
                    nn.Flatten(), nn.Linear(4 * c2, feature_dim), nn.ReLU()]
        elif arch == "resnet":
            body = [nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
                    ResidualBlock(c1, c1), ResidualBlock(c1, c2, stride=2), ResidualBlock(c2, c2),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, feature_dim), nn.ReLU()]
        else:
            raise ValueError(f"unknown classifier arch {arch!r} (cnn or resnet)")
        self.features = nn.Sequential(*body)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, batch_size: int,
                     lr: float, seed: int, channels, feature_dim: int, arch: str,
                     device: str | torch.device = "cpu") -> DomainClassifier:
    """Cross-entropy training on images x in [0, 1], shape [N, C, H, W], with integer labels y."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DomainClassifier(x.shape[1], num_classes, tuple(channels), feature_dim, arch).to(device)
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
                             config["feature_dim"], config.get("arch", "cnn"))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
