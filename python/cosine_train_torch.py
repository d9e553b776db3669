"""Use cosine-train weights in PyTorch.

Builds each cosine-train architecture exactly as the Rust code does (BatchNorm epsilon 1e-3,
ResNet-50 v1 with the stride in the first 1x1 convolution of a bottleneck, CIFAR ResNets with
parameter-free option-A shortcuts and Keras 'same' padding of stride-2 convolutions, the
objective's head) and loads a `model.safetensors` strictly, reading the architecture, loss,
classes and preprocessing from the file's own metadata:

    from cosine_train_torch import load
    model, meta = load("runs/cub-cosine/model.safetensors")   # eval mode
    scores = model(model.preprocess(images_uint8_nhwc))          # as `cosine-train predict`

`torchvision.models.resnet50` also loads the ResNet-50 names, but computes something else
(BatchNorm epsilon 1e-5, stride in the 3x3 convolution); use this module instead.

Needs torch and safetensors. No other file of the repository is needed.
"""

import json

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}


def _bn2d(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


def _same_split(n, k, stride):
    """TensorFlow 'same' padding of one dimension: (before, after), the odd pixel after."""
    out = (n + stride - 1) // stride
    total = max((out - 1) * stride + k - n, 0)
    return total // 2, total - total // 2


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, padding):
        super().__init__()
        self.stride, self.c_in, self.c_out = stride, c_in, c_out
        self.same = stride > 1 and padding == "same"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 0 if self.same else 1, bias=False)
        self.bn1 = _bn2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(c_out)

    def forward(self, x):
        h = x
        if self.same:
            top, bottom = _same_split(x.shape[2], 3, self.stride)
            left, right = _same_split(x.shape[3], 3, self.stride)
            h = F.pad(x, (left, right, top, bottom))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        shortcut = x
        if self.stride > 1:
            s = self.stride
            shortcut = F.avg_pool2d(x, s, s, 0, ceil_mode=True, count_include_pad=True)
        if self.c_out > self.c_in:
            extra = self.c_out - self.c_in
            shortcut = F.pad(shortcut, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth, wide, channels, padding):
        super().__init__()
        widths = [32, 64, 128] if wide else [16, 32, 64]
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = _bn2d(widths[0])
        c_in = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1, padding))
                c_in = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_dim = widths[2]

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return h.mean(dim=(2, 3))


class Bottleneck(nn.Module):
    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, stride, 0, bias=False)
        self.bn1 = _bn2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, 1, 0, bias=False)
        self.bn3 = _bn2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), _bn2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet50(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.bn1 = _bn2d(64)
        c_in = 64
        for stage, (width, count) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
            blocks = []
            for i in range(count):
                blocks.append(Bottleneck(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_dim = 2048

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return h.mean(dim=(2, 3))


class TinyCnn(nn.Module):
    def __init__(self, channels):
        super().__init__()
        c_in = channels
        for i, c_out in enumerate([16, 32, 64]):
            setattr(self, f"conv{i + 1}", nn.Conv2d(c_in, c_out, 3, 1 if i == 0 else 2, 1))
            c_in = c_out
        self.out_dim = 64

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))


def backbone(arch, channels, conv_padding="same"):
    """The feature extractor named `arch` (a cosine-train --arch value)."""
    if arch == "resnet50":
        return ResNet50(channels)
    if arch == "tiny-cnn":
        return TinyCnn(channels)
    if arch == "resnet110-wfc":
        return CifarResNet(110, True, channels, conv_padding)
    if arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[arch], False, channels, conv_padding)
    raise ValueError(f"unknown architecture {arch!r}")


class HeadHolder(nn.Module):
    """cosine-ce's classification head on the embedding: BatchNorm then a linear layer."""

    def __init__(self, dim, classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=BN_EPS, momentum=0.01)
        self.fc = nn.Linear(dim, classes)


class Network(nn.Module):
    """A cosine-train network; `forward` gives the scores `cosine-train predict` prints:
    softmax probabilities (ce, ce-ls, cosine-ce) or cosine similarities to the class
    embeddings (cosine)."""

    def __init__(self, arch, channels, classes, loss, embedding=None, conv_padding="same",
                 meta=None):
        super().__init__()
        self.loss, self.meta = loss, meta or {}
        self.backbone = backbone(arch, channels, conv_padding)
        uses_embedding = loss in ("cosine", "cosine-ce")
        if uses_embedding and embedding is None:
            embedding = torch.eye(classes)
        self.register_buffer("embedding", embedding if uses_embedding else None, persistent=False)
        dim = embedding.shape[1] if uses_embedding else classes
        self.fc = nn.Linear(self.backbone.out_dim, dim)
        self.head = HeadHolder(dim, classes) if loss == "cosine-ce" else None

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        out = self.fc(self.backbone(x))
        if self.embedding is None:
            return out.softmax(1)
        f = out / out.pow(2).sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
        if self.head is not None:
            return self.head.fc(self.head.bn(F.relu(f))).softmax(1)
        return f @ self.embedding.T

    def state_dict_names(self):
        """The state dict without the `backbone.` prefix: the names of the safetensors file."""
        return {k.removeprefix("backbone."): v for k, v in self.state_dict().items()}

    def preprocess(self, images):
        """uint8 images (N, H, W, C) already at the pack's size -> the network's input, as
        cosine-train evaluates: centre crop (when the run had one), then (x - mean) / std per
        channel on 0-255 values (std at least 1e-3)."""
        x = torch.as_tensor(images).float().permute(0, 3, 1, 2)
        crop = self.meta.get("crop")
        if crop:
            top = (x.shape[2] - crop) // 2
            left = (x.shape[3] - crop) // 2
            x = x[:, :, top:top + crop, left:left + crop]
        mean = torch.tensor(self.meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.meta["std"], dtype=torch.float32).clamp_min(1e-3).view(1, -1, 1, 1)
        return (x - mean) / std


def metadata(path):
    """The `__metadata__` of a cosine-train weights file, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    if not raw.get("format", "").startswith("cosine-train-weights/"):
        raise ValueError(f"{path}: not a cosine-train weights file (no cosine-train metadata)")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def load(path, embedding=None):
    """The network of a cosine-train `model.safetensors`, in eval mode, loaded strictly, and
    its metadata. `embedding`: the class-embedding matrix (classes x dim) for a cosine run
    trained with an embedding file (one-hot is built here)."""
    from safetensors.torch import load_file

    meta = metadata(path)
    if meta["embedding"] not in ("onehot", "one-hot") and meta["loss"] in ("cosine", "cosine-ce") \
            and embedding is None:
        raise ValueError(f"{path}: trained with the embedding {meta['embedding']}; pass it as "
                         "embedding= (a classes x dim tensor)")
    if embedding is not None:
        embedding = torch.as_tensor(embedding, dtype=torch.float32)
    net = Network(str(meta["arch"]), int(meta["channels"]), len(meta["classes"]),
                  str(meta["loss"]), embedding, str(meta.get("conv_padding", "same")), meta)
    tensors = load_file(path)
    own = net.state_dict()
    state = {}
    for name, tensor in tensors.items():
        key = name if name.startswith(("fc.", "head.")) else "backbone." + name
        if key in own:
            tensor = tensor.to(own[key].dtype)
        state[key] = tensor
    net.load_state_dict(state, strict=True)
    return net.eval(), meta


if __name__ == "__main__":
    import sys

    model, meta = load(sys.argv[1])
    print(f"{meta['arch']} ({meta['loss']}), {len(meta['classes'])} classes, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
