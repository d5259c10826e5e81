"""The ternary 3D U-Net: one graph, executed here by PyTorch and by the engine after export.

Every node maps 1:1 onto an op of the kernels (docs/kernels.md) and onto a node of the model file
(docs/model-format.md): a float first convolution on the normalised CT, then only ternary-weight
convolutions on ternary activations (batch-norm after each, folded into integer thresholds at
export), 2x2x2 max-pool down (ceil), nearest x2 up to the skip's size, skips by concatenation and a
1x1x1 float classifier to the classes. Design reasoning and MAC counts: docs/model.md.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .ternary import Activation, check_variant, quantize_weights


@dataclass(frozen=True)
class NetworkConfig:
    variant: str = "ternary-tanh"
    base_channels: int = 16
    classes: int = 2

    def __post_init__(self):
        check_variant(self.variant)
        if not 1 <= self.base_channels <= 256:
            raise ValueError(f"base_channels must be in 1..256, got {self.base_channels}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")

    def to_dict(self):
        return asdict(self)


def graph_spec(config):
    """The network as (name, op, inputs, attributes) in execution order; "image" is the input."""
    c = config.base_channels

    def conv(name, op, source, cin, cout, dilation=1):
        return (name, op, [source], {"in_channels": cin, "out_channels": cout, "kernel": [3, 3, 3],
                                     "stride": [1, 1, 1], "dilation": [dilation] * 3})

    return [
        conv("enc1_0", "float_conv3d", "image", 1, c),
        conv("enc1_1", "ternary_conv3d", "enc1_0", c, c),
        ("pool1", "max_pool", ["enc1_1"], {}),
        conv("enc2_0", "ternary_conv3d", "pool1", c, 2 * c),
        conv("enc2_1", "ternary_conv3d", "enc2_0", 2 * c, 2 * c),
        ("pool2", "max_pool", ["enc2_1"], {}),
        conv("enc3_0", "ternary_conv3d", "pool2", 2 * c, 4 * c),
        conv("enc3_1", "ternary_conv3d", "enc3_0", 4 * c, 4 * c, dilation=2),
        ("up2", "upsample", ["enc3_1", "enc2_1"], {}),
        ("cat2", "concat", ["enc2_1", "up2"], {}),
        conv("dec2_0", "ternary_conv3d", "cat2", 6 * c, c),
        ("up1", "upsample", ["dec2_0", "enc1_1"], {}),
        ("cat1", "concat", ["enc1_1", "up1"], {}),
        conv("dec1_0", "ternary_conv3d", "cat1", 2 * c, c),
        ("classifier", "classifier", ["dec1_0"], {"in_channels": c, "classes": config.classes}),
    ]


class ConvBlock(torch.nn.Module):
    """conv (float weights if ``float_weights`` else the variant's quantised weights), batch-norm,
    the variant's activation. No conv bias: the batch-norm shift makes it redundant."""

    def __init__(self, cin, cout, variant, dilation=1, float_weights=False):
        super().__init__()
        self.variant = variant
        self.float_weights = float_weights
        self.dilation = dilation
        self.weight = torch.nn.Parameter(torch.empty(cout, cin, 3, 3, 3))
        torch.nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.bn = torch.nn.BatchNorm3d(cout)
        self.act = Activation(variant)

    def effective_weight(self):
        return self.weight if self.float_weights else quantize_weights(self.weight, self.variant)

    def forward(self, x):
        y = F.conv3d(x, self.effective_weight(), padding=self.dilation, dilation=self.dilation)
        return self.act(self.bn(y))


def max_pool(x):
    """2x2x2, stride 2, ceil: the engine's max_pool (windows clipped at the far border)."""
    return F.max_pool3d(x, kernel_size=2, stride=2, ceil_mode=True)


def upsample(x, like):
    """Nearest x2 to the spatial size of ``like``: out[z, y, x] = in[z//2, y//2, x//2]."""
    for dim in (2, 3, 4):
        x = x.repeat_interleave(2, dim=dim)
    d, h, w = like.shape[2:]
    return x[:, :, :d, :h, :w]


class TernaryUNet(torch.nn.Module):
    def __init__(self, config=NetworkConfig()):
        super().__init__()
        self.config = config
        self.spec = graph_spec(config)
        self.blocks = torch.nn.ModuleDict()
        for name, op, _, attrs in self.spec:
            if op in ("float_conv3d", "ternary_conv3d"):
                self.blocks[name] = ConvBlock(attrs["in_channels"], attrs["out_channels"], config.variant,
                                              dilation=attrs["dilation"][0],
                                              float_weights=(op == "float_conv3d"))
            elif op == "classifier":
                self.blocks[name] = torch.nn.Conv3d(attrs["in_channels"], attrs["classes"], 1)

    def forward(self, image):
        """image: (N, 1, D, H, W) normalised CT -> logits (N, classes, D, H, W)."""
        values = {"image": image}
        for name, op, inputs, _ in self.spec:
            args = [values[i] for i in inputs]
            if op in ("float_conv3d", "ternary_conv3d", "classifier"):
                values[name] = self.blocks[name](args[0])
            elif op == "max_pool":
                values[name] = max_pool(args[0])
            elif op == "upsample":
                values[name] = upsample(args[0], args[1])
            elif op == "concat":
                values[name] = torch.cat(args, dim=1)
            else:  # pragma: no cover - graph_spec only emits the ops above
                raise ValueError(f"unknown op {op!r}")
        return values[self.spec[-1][0]]


def count_macs(config, shape):
    """Multiply-accumulates per node for an input of spatial ``shape`` (D, H, W):
    {name: (op, macs)}; convolutions count Cout*Cin*27 per output voxel."""
    sizes = {"image": tuple(shape)}
    result = {}
    for name, op, inputs, attrs in graph_spec(config):
        src = sizes[inputs[0]]
        if op == "max_pool":
            sizes[name] = tuple(-(-n // 2) for n in src)
        elif op == "upsample":
            sizes[name] = sizes[inputs[1]]
        else:
            sizes[name] = src
        voxels = sizes[name][0] * sizes[name][1] * sizes[name][2]
        if op in ("float_conv3d", "ternary_conv3d"):
            result[name] = (op, voxels * attrs["in_channels"] * attrs["out_channels"] * 27)
        elif op == "classifier":
            result[name] = (op, voxels * attrs["in_channels"] * attrs["classes"])
    return result
