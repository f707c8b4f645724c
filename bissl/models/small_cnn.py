"""A small convolutional backbone for tiny images (the 8x8 digits demo)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # Conv bias is dropped: the following BatchNorm's shift makes it redundant.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),  # not in place: keeps torch.func's forward-mode AD simple
    )


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling.

    Layout: ``width`` channels at full resolution (two 3x3 convs), then ``2 * width`` channels at
    half resolution (a stride-2 3x3 conv and a 3x3 conv), then the spatial mean. With ``width=32``
    and one input channel it has 64,800 conv weights + 384 BatchNorm parameters = 65,184; the
    count grows as ``width**2`` (``width=48``: 146,160). Any input size >= 2 works (global pooling).

    Args:
        in_channels: ``C`` of the input images.
        width: channels of the first stage (the output has ``2 * width`` features).

    Shapes:
        ``(B, C, H, W) -> (B, out_dim)`` with ``out_dim = 2 * width``.
    """

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        if in_channels <= 0 or width <= 0:
            raise ValueError(f"SmallCNN: in_channels and width must be positive, got {in_channels}, {width}")
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, width),
            _conv_bn_relu(width, 2 * width, stride=2),
            _conv_bn_relu(2 * width, 2 * width),
        )
        self.out_dim = 2 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))
