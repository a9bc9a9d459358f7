"""Shared fixtures: the shipped sample data and the raw view of a sample dataset."""
from __future__ import annotations

from pathlib import Path

import pytest

from detr_ssl.data.coco import CocoDetection

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROOT = REPO_ROOT / "data" / "sample"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """data/sample: coco8 as COCO json (train 4 images, val 4 images) and 7 unlabelled photos."""
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def coco8_dir() -> Path:
    """The original coco8 (YOLO labels); outside the repo, so skipped where it is absent."""
    path = SHARED_DATA / "coco8"
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def raw_val() -> CocoDetection:
    """The sample val split without transforms: (PIL image, absolute XYXY target) pairs."""
    return CocoDetection(SAMPLE_ROOT / "val", SAMPLE_ROOT / "annotations" / "instances_val.json",
                         transforms=lambda image, target: (image, target))
