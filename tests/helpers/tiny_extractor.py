"""A tiny torch-fidelity feature extractor, built and saved locally, so FID/KID tests run offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

NAME = "tiny-test-extractor"
FEATURE = "pooled"
NUM_FEATURES = 8


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, NUM_FEATURES, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


class TinyExtractor(FeatureExtractorBase):
    """A fixed random conv net: loads its weights from the path torch-fidelity passes, like Inception does."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = tiny_net()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return (FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError

    def forward(self, x):
        return (self.net(x.float() / 255.0),)


def install(directory: Path) -> Path:
    """Register the extractor (once per process) and save fixed weights; returns the weights path."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, TinyExtractor)
    path = directory / "tiny_extractor.pt"
    torch.manual_seed(0)
    torch.save(tiny_net().state_dict(), path)
    return path
