"""Planted: the neck's first CSP block keeps a residual shortcut (ultralytics' neck C2f blocks have none)."""

from tests.ports.models import student_v8


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck.td_p4 = student_v8.CSPLayer(64 + 32, 32, 1, residual=True)
    return model
