"""The architectures the paper compares, plus a tiny model that keeps tests fast."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from leukodetect.models.registry import ModelSpec, register_model


def _torchvision(name: str, **scratch_kwargs):
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        if pretrained:
            return tvm.get_model(name, weights="DEFAULT")
        return tvm.get_model(name, weights=None, num_classes=num_classes, **scratch_kwargs)

    return build


for _name, _head, _cam in [
    ("resnet50", "fc", "layer4"),
    ("resnet101", "fc", "layer4"),
    ("resnet152", "fc", "layer4"),
]:
    # MixStyle after the first three residual stages (Zhou et al. 2021 mix after the first two or three).
    register_model(ModelSpec(_name, _torchvision(_name), _head, _cam, f"torchvision {_name}, bottleneck residual blocks",
                             style_stages=("layer1", "layer2", "layer3")))

register_model(
    ModelSpec(
        "googlenet",
        # Auxiliary heads only help very deep plain training; the paper's comparison uses the main head.
        _torchvision("googlenet", aux_logits=False, init_weights=True),
        "fc",
        "inception5b",
        "torchvision GoogLeNet (Inception v1), main head only",
    )
)
for _name in ("vgg16", "vgg19"):
    register_model(ModelSpec(_name, _torchvision(_name), "classifier.6", "features", f"torchvision {_name} (no batch norm)",
                             scratch_lr=1e-4))


class TinyNet(nn.Module):
    """A two-block CNN of a few thousand parameters, for tests and smoke runs only."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _build_tiny(num_classes: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError("The tiny test model has no published weights.")
    return TinyNet(num_classes)


register_model(ModelSpec("tiny", _build_tiny, "fc", "features", "tiny 2-block CNN for tests (not for real use)"))
