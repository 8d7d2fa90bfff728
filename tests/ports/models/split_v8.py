"""A CSPDarknet-style YOLOv8: stages are `nn.Sequential(conv, csp)`, the C2f's first 1x1 conv is written as two
convs (one per half), registered after the merge conv; upsampling and concatenation are modules; the head has a
DFL module with a frozen projection, takes a list of levels, returns a dict and initialises its biases as
ultralytics does."""

import math

import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.norm = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut):
        super().__init__()
        self.conv1, self.conv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if self.shortcut:
            out = out + x
        return out


class SplitC2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        c = c2 // 2
        self.merge = Conv((2 + n) * c, c2)          # registered first on purpose
        self.left = Conv(c1, c)
        self.right = Conv(c1, c)
        self.blocks = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))

    def forward(self, x):
        outs = [self.left(x), self.right(x)]
        for block in self.blocks:
            outs.append(block(outs[-1]))
        return self.merge(torch.cat(outs, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        self.reduce = Conv(c1, c1 // 2)
        self.pool = nn.MaxPool2d(k, 1, k // 2)
        self.project = Conv(c1 * 2, c2)

    def forward(self, x):
        y0 = self.reduce(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        return self.project(torch.cat((y0, y1, y2, self.pool(y2)), 1))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class DFL(nn.Module):
    def __init__(self, bins=16):
        super().__init__()
        self.proj = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.proj.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        self.bins = bins

    def forward(self, x):
        b, _, a = x.shape
        return self.proj(x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectHead(nn.Module):
    def __init__(self, nc, chs, reg_max=16, strides=(8.0, 16.0, 32.0)):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        c2, c3 = max(16, chs[0] // 4, reg_max * 4), max(chs[0], min(nc, 100))
        self.reg = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in chs)
        self.dfl = DFL(reg_max)
        self.register_buffer("stride", torch.tensor(strides), persistent=False)
        self.init_biases()

    @torch.no_grad()
    def init_biases(self):
        for reg, cls, s in zip(self.reg, self.cls, self.stride):
            reg[-1].bias.fill_(2.0)
            cls[-1].bias[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def forward(self, feats):
        b = feats[0].shape[0]
        boxes = torch.cat([r(x).view(b, 4 * self.reg_max, -1) for r, x in zip(self.reg, feats)], 2)
        scores = torch.cat([c(x).view(b, self.nc, -1) for c, x in zip(self.cls, feats)], 2)
        return {"boxes": boxes, "scores": scores}


class YOLOv8(nn.Module):
    def __init__(self, nc=12):
        super().__init__()
        self.stem = Conv(3, 8, 3, 2)
        self.dark2 = nn.Sequential(Conv(8, 8, 3, 2), SplitC2f(8, 8, 1, True))
        self.dark3 = nn.Sequential(Conv(8, 16, 3, 2), SplitC2f(16, 16, 2, True))
        self.dark4 = nn.Sequential(Conv(16, 32, 3, 2), SplitC2f(32, 32, 2, True))
        self.dark5 = nn.Sequential(Conv(32, 64, 3, 2), SplitC2f(64, 64, 1, True), SPPF(64, 64))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.cat = Concat()
        self.c2f_p4 = SplitC2f(96, 32)
        self.c2f_p3 = SplitC2f(48, 16)
        self.down_p3 = Conv(16, 16, 3, 2)
        self.c2f_n4 = SplitC2f(48, 32)
        self.down_p4 = Conv(32, 32, 3, 2)
        self.c2f_n5 = SplitC2f(96, 64)
        self.detect = DetectHead(nc, (16, 32, 64))

    def forward(self, x):
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        p4 = self.c2f_p4(self.cat([self.up(c5), c4]))
        p3 = self.c2f_p3(self.cat([self.up(p4), c3]))
        n4 = self.c2f_n4(self.cat([self.down_p3(p3), p4]))
        n5 = self.c2f_n5(self.cat([self.down_p4(n4), c5]))
        return self.detect([p3, n4, n5])


def build(nc=12):
    return YOLOv8(nc)
