"""detr_ssl: self-supervised pre-training for DETR-family object detectors."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``detr_ssl.Detector``, imported on first use: it pulls in torch and the models, which
    ``import detr_ssl`` alone (the version, the command line's help) does not need."""
    if name == "Detector":
        from detr_ssl.api import Detector
        return Detector
    raise AttributeError(f"module 'detr_ssl' has no attribute {name!r}")
