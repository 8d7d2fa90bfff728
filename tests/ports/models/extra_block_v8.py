"""Planted: the neck's first CSP block has three residual units where ultralytics' C2f (n=1) has one."""

from tests.ports.models import student_v8


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck.td_p4 = student_v8.CSPLayer(64 + 32, 32, 3, residual=False)
    return model
