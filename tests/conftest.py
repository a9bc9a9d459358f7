"""Shared fixtures: the shipped sample data and the raw view of a sample dataset."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from detr_ssl.data.coco import CocoDetection

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROOT = REPO_ROOT / "data" / "sample"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """data/sample: coco8 as COCO json (train 4 images, val 4 images) and 7 unlabelled photos."""
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def coco8_dir(tmp_path_factory) -> Path:
    """The original coco8 YOLO layout (images/S, labels/S, coco8.yaml), rebuilt from data/sample's
    images and the YOLO labels in tests/fixtures/coco8."""
    root = tmp_path_factory.mktemp("coco8")
    shutil.copy(FIXTURES / "coco8" / "coco8.yaml", root)
    shutil.copytree(FIXTURES / "coco8" / "labels", root / "labels")
    for split in ("train", "val"):
        shutil.copytree(SAMPLE_ROOT / split, root / "images" / split)
    return root


@pytest.fixture(scope="session")
def raw_val() -> CocoDetection:
    """The sample val split without transforms: (PIL image, absolute XYXY target) pairs."""
    return CocoDetection(SAMPLE_ROOT / "val", SAMPLE_ROOT / "annotations" / "instances_val.json",
                         transforms=lambda image, target: (image, target))
