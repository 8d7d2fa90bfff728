"""Planted: a neck that upsamples by indexing with a half-pixel shift (rows (2i + 1) // 2, not i // 2) and
concatenates by copying into a preallocated buffer, so neither step is an operation the harness recognises:
layers 10 and 11 cannot be compared, and the difference first shows at layer 12."""

import torch

from tests.ports.models import student_v8


def shifted_upsample(x):
    h, w = x.shape[-2:]
    rows = ((torch.arange(2 * h) + 1) // 2).clamp(max=h - 1)
    cols = ((torch.arange(2 * w) + 1) // 2).clamp(max=w - 1)
    return x[:, :, rows][:, :, :, cols]


def concat_into(a, b):
    out = a.new_empty(a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
    out[:, : a.shape[1]] = a
    out[:, a.shape[1]:] = b
    return out


class PreallocNeck(student_v8.Neck):
    def forward(self, c3, c4, c5):
        p4_td = self.td_p4(concat_into(shifted_upsample(c5), c4))
        p3 = self.td_p3(concat_into(shifted_upsample(p4_td), c3))
        p4 = self.bu_p4(concat_into(self.down_p3(p3), p4_td))
        p5 = self.bu_p5(concat_into(self.down_p4(p4), c5))
        return p3, p4, p5, p4_td


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck = PreallocNeck()
    return model
