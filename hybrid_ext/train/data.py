"""Data for the demo and the recipes: the embedded digits set by default, an image folder by path.

The default is scikit-learn's bundled copy of the UCI handwritten digits (1,797 8×8 grey images, 10 classes),
which ships inside scikit-learn and loads with no network; images are upscaled (bilinear) so that a small
AlexNet-style network has spatial extent to work on. ``--data PATH`` takes an ImageFolder tree (one folder per
class) or a CIFAR-10 folder (``cifar-10-batches-py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class Dataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    name: str

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


def digits(size: int = 32, test_fraction: float = 1 / 6, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(raw.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(images[train], labels[train], images[test], labels[test], 10, f"digits{size}")


def image_folder(path: str | Path, size: int = 32) -> Dataset:
    import torchvision
    from torchvision import transforms

    path = Path(path)
    tf = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    if (path / "cifar-10-batches-py").exists() or path.name == "cifar-10-batches-py":
        root = path.parent if path.name == "cifar-10-batches-py" else path
        train = torchvision.datasets.CIFAR10(str(root), train=True, transform=tf, download=False)
        test = torchvision.datasets.CIFAR10(str(root), train=False, transform=tf, download=False)
    else:
        full = torchvision.datasets.ImageFolder(str(path), transform=tf)
        n_test = max(1, len(full) // 6)
        train, test = torch.utils.data.random_split(
            full, [len(full) - n_test, n_test], generator=torch.Generator().manual_seed(0)
        )

    def stack(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    classes = int(max(train_y.max(), test_y.max())) + 1
    return Dataset(train_x, train_y, test_x, test_y, classes, path.name)


def load(data: str | None, size: int, channels: int | None = None) -> Dataset:
    """The embedded digits (``data=None``) or a folder; ``channels=3`` turns grayscale into RGB for ImageNet CNNs."""
    dataset = digits(size) if data is None else image_folder(data, size)
    if channels is not None and channels != dataset.channels:
        if dataset.channels != 1:
            raise ValueError(f"{dataset.name} has {dataset.channels} channels; the model wants {channels}")
        dataset.train_x = dataset.train_x.expand(-1, channels, -1, -1).contiguous()
        dataset.test_x = dataset.test_x.expand(-1, channels, -1, -1).contiguous()
    return dataset
