"""detr_ssl: self-supervised pre-training for DETR-family object detectors."""

__version__ = "0.1.0"
