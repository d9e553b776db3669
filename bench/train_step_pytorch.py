"""The PyTorch side of bench/train.sh: the same training step as `cosine-train bench-step`.

Same model definitions (CIFAR ResNet with option-A shortcuts; ResNet-50 v1 with the stride on the
first 1x1 conv), BatchNorm eps 1e-3 / momentum 0.01, a linear head, softmax cross-entropy, SGD
with momentum 0.9 in Keras form (v = 0.9 v - lr g; p += v) with L2 added to the gradient and a
global-norm clip at 10, on one synthetic batch kept in memory. Prints one JSON line with the
median step time, like bench-step.

    python bench/train_step_pytorch.py --arch resnet20 --batch-size 100 --size 32 --threads 2

With --ddp, under torchrun, each process steps on --batch-size images and DistributedDataParallel
(gloo on CPU, NCCL on CUDA) averages the gradients; rank 0 prints the median whole-step time.
--device cuda and --precision bf16 (autocast) run it on a GPU, as bench/gpu-check.sh does.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x
        if self.stride != 1:
            s = F.avg_pool2d(s, 2)
        if self.pad:
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + s)


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, in_ch, classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = bn(widths[0])
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(Basic(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, stride, bias=False)
        self.bn1 = bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = bn(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, in_ch, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
        self.bn1 = bn(64)
        layers, c = [], 64
        for i, (width, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
            for j in range(n):
                layers.append(Bottleneck(c, width, 2 if (i > 0 and j == 0) else 1))
                c = 4 * width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.layers(x).mean((2, 3)))


def build(arch, in_ch, classes):
    if arch == "resnet50":
        return ResNet50(in_ch, classes), 0.0
    table = {"resnet8": (8, False), "resnet20": (20, False), "resnet32": (32, False),
             "resnet56": (56, False), "resnet110": (110, False), "resnet110-wfc": (110, True)}
    depth, wide = table[arch]
    widths = (32, 64, 128) if wide else (16, 32, 64)
    return CifarResNet(depth, widths, in_ch, classes), 2e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--ddp", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world = 0, 1
    if a.ddp:
        import torch.distributed as dist
        dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(a.device)
    torch.manual_seed(0)
    net, l2 = build(a.arch, a.channels, a.classes)
    net = net.to(device)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    model = nn.parallel.DistributedDataParallel(net) if a.ddp else net
    velocity = [torch.zeros_like(p) for p in params]
    images = torch.randn(a.batch_size, a.channels, a.size, a.size, device=device)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(a.classes, (a.batch_size,), device=device)
    lr, times = 0.01, []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward_backward():
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()

    def update():
        with torch.no_grad():
            grads = [p.grad + (2 * l2) * p if (l2 and p.dim() >= 2) else p.grad for p in params]
            norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
            scale = 10.0 / norm if norm >= 10.0 else 1.0
            for p, v, g in zip(params, velocity, grads):
                v.mul_(0.9).sub_(g, alpha=lr * scale)
                p.add_(v)

    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        forward_backward()
        update()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    # The phases alone, the device waited for after each (as bench-step's breakdown).
    phases = {"forward_backward": [], "update": []}
    for i in range(a.steps):
        for name, phase in (("forward_backward", forward_backward), ("update", update)):
            start = time.perf_counter()
            phase()
            sync()
            phases[name].append(time.perf_counter() - start)
    median = statistics.median(times)
    if rank == 0:
        print(json.dumps({
            "arch": a.arch, "batch_size": a.batch_size, "image": [a.channels, a.size, a.size],
            "parameters": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "steps": a.steps, "step_seconds_median": median,
            "images_per_sec": world * a.batch_size / median, "world_size": world,
            "device": a.device, "precision": a.precision, "channels_last": a.channels_last,
            "phase_seconds_median": {k: statistics.median(v) for k, v in phases.items()},
        }))
    if a.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
