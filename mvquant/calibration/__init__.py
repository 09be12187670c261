from .calibrate import calibrate, qkv_hooks
from .report import CalibrationReport, load_report

__all__ = ["calibrate", "qkv_hooks", "CalibrationReport", "load_report"]
