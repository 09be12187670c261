"""mvquant: find the massive Q/K values of RoPE models and keep them while quantizing."""
from .calibration import CalibrationReport, calibrate, load_report
from .errors import MvquantError
from .models import get_layout, load_model

__version__ = "0.1.0"
__all__ = ["calibrate", "load_report", "CalibrationReport", "load_model", "get_layout", "MvquantError"]
