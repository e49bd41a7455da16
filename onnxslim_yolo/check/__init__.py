"""Pre-deployment checks: structure, runtime, numerics and accuracy against a reference, QDQ
lint and latency. Each check returns a :class:`CheckResult`; :func:`run_checks` runs them all.

    from onnxslim_yolo.check import run_checks
    report = run_checks("yolov5n.int8.onnx", reference="yolov5n.onnx", images="coco/images")
    if not report.ok:
        for r in report.failures:
            print(r.name, r.message)
"""
from .result import FAIL, PASS, SKIP, STATUSES, WARN, CheckReport, CheckResult
from .runner import CheckOptions, run_checks

__all__ = ["CheckResult", "CheckReport", "CheckOptions", "run_checks", "STATUSES", "PASS", "FAIL", "WARN",
           "SKIP"]
