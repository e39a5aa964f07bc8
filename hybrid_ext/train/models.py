"""Models for the demo and recipes: an FC-heavy AlexNet-style CNN, and torchvision's own CNNs by name."""

from __future__ import annotations

import torch
from torch import nn


def digits_alexnet(channels: int = 1, classes: int = 10, width: int = 1024) -> nn.Module:
    """Conv features (~0.1 M parameters), then three wide Linear layers (~3.2 M): the FC-heavy shape of AlexNet."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128 * 16, width),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


MIN_SIZE = {"digits_alexnet": 8, "alexnet": 63, "vgg11": 32, "resnet18": 32}
"""Smallest input side each model accepts (AlexNet's stride-4 stem and three 3×3/2 pools need 63)."""
DEFAULT_SIZE = {"digits_alexnet": 32, "alexnet": 64, "vgg11": 32, "resnet18": 32}
"""Input side each model trains at unless told (``--size``)."""
DEFAULT_LR = {"digits_alexnet": 1e-3, "alexnet": 1e-4, "vgg11": 1e-4, "resnet18": 1e-3}
"""Adam's learning rate for each model unless told (``--lr``): the deeper torchvision CNNs, without BatchNorm,
take a smaller step; ResNet-18 has BatchNorm."""


def input_channels(name: str) -> int | None:
    """Channels the model needs (torchvision's ImageNet CNNs: 3), or None for whatever the data has."""
    return 3 if name in ("alexnet", "vgg11", "resnet18") else None


def build(name: str, channels: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "digits_alexnet":
        return digits_alexnet(channels, classes)
    import torchvision

    if name in ("alexnet", "vgg11", "resnet18"):
        if channels != 3:
            raise ValueError(f"{name} expects 3-channel images; use --model digits_alexnet for the digits set")
        return getattr(torchvision.models, name)(num_classes=classes)
    raise ValueError(f"unknown model {name!r}; choose digits_alexnet, alexnet, vgg11 or resnet18")
