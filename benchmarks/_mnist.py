"""The MNIST yardstick shared by the benchmarks: the digit classifier and the test-set reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difflab.data.images import load_image_dataset
from difflab.evaluation import image_features, load_or_train_classifier
from difflab.metrics import feature_statistics


@dataclass
class MnistYardstick:
    """``net``: the cached digit classifier; ``reference``: (mu, cov) of its features on the
    ``n_test`` test images; ``train``: the training set (``images`` uint8, ``labels``)."""

    net: Any
    reference: tuple[torch.Tensor, torch.Tensor]
    n_test: int
    train: Any


def mnist_yardstick(data_dir: str, *, cache_dir: str | None = None, device="cpu") -> MnistYardstick:
    """Load (or train once and cache) the classifier and the reference statistics."""
    net = load_or_train_classifier(data_dir=data_dir, cache_dir=cache_dir, device=device)
    test = load_image_dataset("mnist", data_dir=data_dir, train=False)
    reference = feature_statistics(image_features(net, test.images))
    train = load_image_dataset("mnist", data_dir=data_dir, train=True)
    return MnistYardstick(net, reference, len(test), train)
