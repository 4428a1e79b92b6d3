"""Whole-smear pipeline: find white cells, crop, classify, count, overlay (see :mod:`.pipeline`)."""

from leukodetect.detection.pipeline import Detector, analyze, load_detector

__all__ = ["Detector", "analyze", "load_detector"]
