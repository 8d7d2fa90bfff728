"""Planted: the course project's YOLOv8 with a bilinear first upsample in the neck (ultralytics: nearest)."""

import torch
import torch.nn.functional as F

from tests.ports.models import student_v8


class BilinearNeck(student_v8.Neck):
    def forward(self, c3, c4, c5):
        up = F.interpolate(c5, scale_factor=2.0, mode="bilinear", align_corners=False)
        p4_td = self.td_p4(torch.cat([up, c4], 1))
        x = torch.cat([F.interpolate(p4_td, scale_factor=2.0, mode="nearest"), c3], 1)
        p3 = self.td_p3(x)
        p4 = self.bu_p4(torch.cat([self.down_p3(p3), p4_td], 1))
        p5 = self.bu_p5(torch.cat([self.down_p4(p4), c5], 1))
        return p3, p4, p5, p4_td


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck = BilinearNeck()
    return model
