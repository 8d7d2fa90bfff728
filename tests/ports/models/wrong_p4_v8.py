"""Planted: the head takes the top-down P4 (layer 12) instead of the bottom-up P4 (layer 18); same shape."""

from tests.ports.models import student_v8


class WrongP4(student_v8.Detector):
    def forward(self, img):
        p3, _, p5, p4_td = self.neck(*self.backbone(img))
        return self.head.forward(p3, p4_td, p5)


def build(nc=12):
    return WrongP4(nc)
