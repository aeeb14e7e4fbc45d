"""A model of a user's own, outside alexdist, named by import path: model.name=mymodels:Tiny with this folder
on PYTHONPATH (tests/unit and tests/e2e test_own_model.py)."""

import torch.nn as nn


class Tiny(nn.Module):
    """A body of two BatchNorm convs and a head whose first linear (131k parameters) is a sharding unit."""

    def __init__(self, num_classes, input_size=32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))
        self.input_size = input_size

    def forward(self, x):
        return self.head(self.body(x))


def stack(num_classes, input_size=32):
    """A factory returning a bare nn.Sequential, whose forward names its argument `input`, not `x`."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4, num_classes))
