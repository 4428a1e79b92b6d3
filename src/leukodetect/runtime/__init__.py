"""The bottom layer: checkpoint bundles, device and precision, image decoding, the classifier runtime, export.

It imports nothing from the layers above it (data, training, evaluation, detection, reporting, jobs,
serving, cli); see docs/architecture.md.
"""
