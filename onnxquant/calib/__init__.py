"""Calibration: data sources, streaming statistics, the method registry, bit allocation, weight ranges."""
