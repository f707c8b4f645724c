"""ResNet-18/50 backbones (He et al., 2016), written here; no weights are ever downloaded.

The architecture follows the standard ImageNet ResNet ("v1.5": the stride of a downsampling
Bottleneck sits on its 3x3 conv) without the final fully connected layer, so the output is the
globally pooled feature vector: 512 features for ResNet-18, 2048 for ResNet-50. Parameter counts
with 3 input channels: ResNet-18 11,176,512 and ResNet-50 23,508,032 (the usual 11.7M / 25.6M minus
the 1000-way classifier). ``small_input=True`` replaces the 7x7 stride-2 stem and its max-pool by
a 3x3 stride-1 conv, the common choice for 32-96 px images (CIFAR, STL-10), where downsampling by
4 before the first stage would throw away most of the resolution.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(c_in, planes * self.expansion, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(c_in, planes * self.expansion, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection + BN when the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet feature extractor: stem, four stages, global average pooling (no classifier).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: ``C`` of the input images.
        small_input: 3x3 stride-1 stem without max-pool (for images of ~32-96 px).
        zero_init_residual: start each block's last BN at weight 0 so every block begins as the
            identity (Goyal et al., 2017); off by default.

    Shapes:
        ``(B, C, H, W) -> (B, out_dim)``, ``out_dim = 512 * block.expansion``.
    """

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        *,
        in_channels: int = 3,
        small_input: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"ResNet: in_channels must be positive, got {in_channels}")
        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        stages = []
        c_in = 64
        for i, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(c_in, planes, stride if j == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = c_in

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def resnet18(*, in_channels: int = 3, small_input: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 backbone (BasicBlock, 2-2-2-2), 512 output features."""
    return ResNet(
        BasicBlock,
        (2, 2, 2, 2),
        in_channels=in_channels,
        small_input=small_input,
        zero_init_residual=zero_init_residual,
    )


def resnet50(*, in_channels: int = 3, small_input: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 backbone (Bottleneck, 3-4-6-3), 2048 output features."""
    return ResNet(
        Bottleneck,
        (3, 4, 6, 3),
        in_channels=in_channels,
        small_input=small_input,
        zero_init_residual=zero_init_residual,
    )
