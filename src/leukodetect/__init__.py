"""leukodetect: detect acute lymphoblastic leukemia in blood-smear images, and evaluate it honestly."""

__version__ = "0.1.0"
