"""MNIST and CIFAR-10 through torchvision, from a local root (or a download, where the network allows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.registry import Settings
from tasks.sources import SOURCES, Source, SourceSplit


class TorchvisionSettings(Settings):
    not_hashed = frozenset({"download"})  # where the files came from changes no output
    study_wide = frozenset({"root", "download"})

    root: str | None = None  # local torchvision root for mnist/cifar10 (relative to the project root)
    download: bool = False  # let torchvision download into root (default data/raw) when online


class TorchvisionSource(Source):
    """A torchvision dataset with its official train/test split."""

    dataset = ""  # torchvision.datasets class name
    rows, shape = 0, (1,)  # train + test images, and an image's shape

    @classmethod
    def size_bound(cls, data):
        return cls.rows, cls.shape, "data.source"

    @classmethod
    def root(cls, data, project_root: Path) -> Path:
        root = Path(data.root) if data.root else project_root / "data" / "raw"
        return root if root.is_absolute() else project_root / root

    @classmethod
    def open(cls, data, root: Path, train: bool):
        import torchvision

        return getattr(torchvision.datasets, cls.dataset)(str(root), train=train, download=data.download)

    @classmethod
    def check(cls, data, project_root):
        from tasks.params import ParamsError

        root = cls.root(data, project_root)
        if data.download:
            return
        if data.root is None:
            raise ParamsError(f"data.root: {data.source} needs a local dataset root (torchvision layout), "
                              f"or data.download: true to fetch it into {root}")
        if not root.is_dir():
            raise ParamsError(f"data.root: {root} does not exist (expected a torchvision {data.source} root)")
        try:
            cls.open(data, root, train=False)
        except RuntimeError as err:
            raise ParamsError(f"data.root: {root} holds no usable {data.source} files ({err})") from None

    @classmethod
    def arrays(cls, data, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = cls.open(data, root, train)
        pixels = np.asarray(ds.data)
        x = (pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
        return x, np.asarray(ds.targets, dtype=np.int64)

    @classmethod
    def load(cls, data, seed, project_root, family) -> SourceSplit:
        root = cls.root(data, project_root)
        train_x, train_y = cls.arrays(data, root, train=True)
        test_x, test_y = cls.arrays(data, root, train=False)
        return SourceSplit(train_x, train_y, test_x, test_y, 10)


@SOURCES.register("mnist", settings={"data": TorchvisionSettings})
class MNIST(TorchvisionSource):
    """MNIST (60,000 + 10,000 28x28 digits) from a local torchvision root."""

    dataset = "MNIST"
    rows, shape = 70_000, (1, 28, 28)


@SOURCES.register("cifar10", settings={"data": TorchvisionSettings})
class CIFAR10(TorchvisionSource):
    """CIFAR-10 (50,000 + 10,000 32x32 colour images) from a local torchvision root."""

    dataset = "CIFAR10"
    rows, shape = 60_000, (3, 32, 32)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
