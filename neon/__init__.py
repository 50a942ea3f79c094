"""Neon: Negative Extrapolation frOm self-traiNing (arXiv 2510.03597).

θneon = (1 + w)·θr − w·θs, where θr is a trained generator and θs is θr briefly fine-tuned on its own samples.
"""
__version__ = "0.1.0"
