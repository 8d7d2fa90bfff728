"""Planted: the backbone's P4 feature is multiplied by 0.01 before the first neck concat."""

import torch
import torch.nn.functional as F

from tests.ports.models import student_v8


class ScaledNeck(student_v8.Neck):
    def forward(self, c3, c4, c5):
        x = torch.cat([F.interpolate(c5, scale_factor=2.0, mode="nearest"), c4 * 0.01], 1)
        p4_td = self.td_p4(x)
        x = torch.cat([F.interpolate(p4_td, scale_factor=2.0, mode="nearest"), c3], 1)
        p3 = self.td_p3(x)
        p4 = self.bu_p4(torch.cat([self.down_p3(p3), p4_td], 1))
        p5 = self.bu_p5(torch.cat([self.down_p4(p4), c5], 1))
        return p3, p4, p5, p4_td


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck = ScaledNeck()
    return model
