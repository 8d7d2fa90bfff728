"""A course project's YOLOv8: Backbone / Neck / Head classes with their own names, written from the paper's
figures. The neck registers its two stride-2 convs before its CSP blocks and upsamples and concatenates
functionally inside `Neck.forward`; the head is called as `self.head.forward(p3, p4, p5)` and returns a tuple of
per-level maps; SiLU is written by hand; there is no DFL module and no bias initialisation (PyTorch's default)."""

import torch
import torch.nn.functional as F
from torch import nn


def silu(x):
    return x * torch.sigmoid(x)


class CBS(nn.Module):
    """conv - batchnorm - silu"""

    def __init__(self, cin, cout, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)

    def forward(self, x):
        return silu(self.bn(self.conv(x)))


class ResUnit(nn.Module):
    def __init__(self, c, residual):
        super().__init__()
        self.a = CBS(c, c, 3)
        self.b = CBS(c, c, 3)
        self.residual = residual

    def forward(self, x):
        y = self.b(self.a(x))
        return x + y if self.residual else y


class CSPLayer(nn.Module):
    """C2f: split, a chain of residual units on the second half, concatenate everything, fuse."""

    def __init__(self, cin, cout, n=1, residual=True):
        super().__init__()
        self.half = cout // 2
        self.stem = CBS(cin, 2 * self.half)
        self.units = nn.ModuleList([ResUnit(self.half, residual) for _ in range(n)])
        self.fuse = CBS((2 + n) * self.half, cout)

    def forward(self, x):
        y = self.stem(x)
        pieces = [y[:, :self.half], y[:, self.half:]]
        for unit in self.units:
            pieces.append(unit(pieces[-1]))
        return self.fuse(torch.cat(pieces, dim=1))


class FastPool(nn.Module):
    """SPPF"""

    def __init__(self, cin, cout):
        super().__init__()
        self.squeeze = CBS(cin, cin // 2)
        self.expand = CBS(cin * 2, cout)

    def forward(self, x):
        x = self.squeeze(x)
        a = F.max_pool2d(x, 5, 1, 2)
        b = F.max_pool2d(a, 5, 1, 2)
        c = F.max_pool2d(b, 5, 1, 2)
        return self.expand(torch.cat([x, a, b, c], 1))


class Backbone(nn.Module):
    def __init__(self, w=(8, 8, 16, 32, 64), n=(1, 2, 2, 1)):
        super().__init__()
        self.stem = CBS(3, w[0], 3, 2)
        self.down1 = CBS(w[0], w[1], 3, 2)
        self.stage1 = CSPLayer(w[1], w[1], n[0])
        self.down2 = CBS(w[1], w[2], 3, 2)
        self.stage2 = CSPLayer(w[2], w[2], n[1])
        self.down3 = CBS(w[2], w[3], 3, 2)
        self.stage3 = CSPLayer(w[3], w[3], n[2])
        self.down4 = CBS(w[3], w[4], 3, 2)
        self.stage4 = CSPLayer(w[4], w[4], n[3])
        self.pool = FastPool(w[4], w[4])

    def forward(self, x):
        x = self.stage1(self.down1(self.stem(x)))
        c3 = self.stage2(self.down2(x))
        c4 = self.stage3(self.down3(c3))
        c5 = self.pool(self.stage4(self.down4(c4)))
        return c3, c4, c5


class Neck(nn.Module):
    """PAN. The downsampling convs come first in __init__: registration order is not execution order."""

    def __init__(self, c3=16, c4=32, c5=64, n=1, residual=False):
        super().__init__()
        self.down_p3 = CBS(c3, c3, 3, 2)
        self.down_p4 = CBS(c4, c4, 3, 2)
        self.td_p4 = CSPLayer(c5 + c4, c4, n, residual)
        self.td_p3 = CSPLayer(c4 + c3, c3, n, residual)
        self.bu_p4 = CSPLayer(c3 + c4, c4, n, residual)
        self.bu_p5 = CSPLayer(c4 + c5, c5, n, residual)

    def forward(self, c3, c4, c5):
        x = torch.cat([F.interpolate(c5, scale_factor=2.0, mode="nearest"), c4], 1)
        p4_td = self.td_p4(x)
        x = torch.cat([F.interpolate(p4_td, scale_factor=2.0, mode="nearest"), c3], 1)
        p3 = self.td_p3(x)
        p4 = self.bu_p4(torch.cat([self.down_p3(p3), p4_td], 1))
        p5 = self.bu_p5(torch.cat([self.down_p4(p4), c5], 1))
        return p3, p4, p5, p4_td


class Head(nn.Module):
    def __init__(self, nc=12, chs=(16, 32, 64), reg_max=16):
        super().__init__()
        box_c, cls_c = max(16, chs[0] // 4, 4 * reg_max), max(chs[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(CBS(c, box_c, 3), CBS(box_c, box_c, 3), nn.Conv2d(box_c, 4 * reg_max, 1))
                                 for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(CBS(c, cls_c, 3), CBS(cls_c, cls_c, 3), nn.Conv2d(cls_c, nc, 1))
                                 for c in chs)

    def forward(self, p3, p4, p5):
        return tuple(torch.cat([b(x), c(x)], 1) for b, c, x in zip(self.box, self.cls, (p3, p4, p5)))


class Detector(nn.Module):
    def __init__(self, nc=12):
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = Head(nc)

    def forward(self, img):
        p3, p4, p5, _ = self.neck(*self.backbone(img))
        return self.head.forward(p3, p4, p5)


def build(nc=12):
    return Detector(nc)
