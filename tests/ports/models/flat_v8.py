"""A YOLOv8 written as one module with a flat attribute per block (`b0` ... `n21`, in reading order), functional
SiLU, `torch.concat` and size-based `F.interpolate`; the head returns a (boxes, scores) tuple of flat tensors and
initialises its biases with Python floats."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvUnit(nn.Sequential):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2, 1e-3, 0.03))

    def forward(self, x):
        return F.silu(super().forward(x))


class CSP(nn.Module):
    def __init__(self, c1, c2, n, add):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvUnit(c1, 2 * self.c)
        self.cv2 = ConvUnit((2 + n) * self.c, c2)
        self.m = nn.ModuleList(nn.ModuleList([ConvUnit(self.c, self.c, 3), ConvUnit(self.c, self.c, 3)])
                               for _ in range(n))
        self.add = add

    def forward(self, x):
        ys = list(self.cv1(x).split((self.c, self.c), 1))
        for first, second in self.m:
            y = second(first(ys[-1]))
            ys.append(ys[-1] + y if self.add else y)
        return self.cv2(torch.concat(ys, 1))


class Pyramid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = ConvUnit(c, c // 2), ConvUnit(2 * c, c)

    def forward(self, x):
        ys = [self.a(x)]
        for _ in range(3):
            ys.append(F.max_pool2d(ys[-1], kernel_size=5, stride=1, padding=2))
        return self.b(torch.concat(ys, 1))


class Head(nn.Module):
    def __init__(self, nc, chs, reg_max=16):
        super().__init__()
        self.nc, self.no = nc, 4 * reg_max
        self.box = nn.ModuleList(nn.Sequential(ConvUnit(c, 64, 3), ConvUnit(64, 64, 3), nn.Conv2d(64, self.no, 1))
                                 for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(ConvUnit(c, 16, 3), ConvUnit(16, 16, 3), nn.Conv2d(16, nc, 1))
                                 for c in chs)
        for box, cls, stride in zip(self.box, self.cls, (8, 16, 32)):
            nn.init.constant_(box[-1].bias, 2.0)
            nn.init.constant_(cls[-1].bias, math.log(5 / nc / (640 / stride) ** 2))

    def forward(self, feats):
        b = feats[0].shape[0]
        boxes = torch.concat([m(x).flatten(2) for m, x in zip(self.box, feats)], 2)
        scores = torch.concat([m(x).reshape(b, self.nc, -1) for m, x in zip(self.cls, feats)], 2)
        return boxes, scores


class FlatYOLO(nn.Module):
    def __init__(self, nc=12):
        super().__init__()
        self.b0, self.b1, self.b2 = ConvUnit(3, 8, 3, 2), ConvUnit(8, 8, 3, 2), CSP(8, 8, 1, True)
        self.b3, self.b4 = ConvUnit(8, 16, 3, 2), CSP(16, 16, 2, True)
        self.b5, self.b6 = ConvUnit(16, 32, 3, 2), CSP(32, 32, 2, True)
        self.b7, self.b8, self.b9 = ConvUnit(32, 64, 3, 2), CSP(64, 64, 1, True), Pyramid(64)
        self.n12, self.n15 = CSP(96, 32, 1, False), CSP(48, 16, 1, False)
        self.n16, self.n18 = ConvUnit(16, 16, 3, 2), CSP(48, 32, 1, False)
        self.n19, self.n21 = ConvUnit(32, 32, 3, 2), CSP(96, 64, 1, False)
        self.head = Head(nc, (16, 32, 64))

    def forward(self, x):
        x4 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        x6 = self.b6(self.b5(x4))
        x9 = self.b9(self.b8(self.b7(x6)))
        x12 = self.n12(torch.concat([F.interpolate(x9, size=x6.shape[-2:], mode="nearest"), x6], 1))
        x15 = self.n15(torch.concat([F.interpolate(x12, size=x4.shape[-2:], mode="nearest"), x4], 1))
        x18 = self.n18(torch.concat([self.n16(x15), x12], 1))
        x21 = self.n21(torch.concat([self.n19(x18), x9], 1))
        return self.head([x15, x18, x21])


def build(nc=12):
    return FlatYOLO(nc)
