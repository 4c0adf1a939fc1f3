"""Calibration tools (SPEC 6): linearity, flat, gain, full well; command layer in ``commands``."""
