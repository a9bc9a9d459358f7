"""Shared fixtures: the shipped sample data and the raw view of a sample dataset."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from detr_ssl.data import collate_fn
from detr_ssl.data.coco import CocoDetection
from detr_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from detr_ssl.utils.misc import NestedTensor

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROOT = REPO_ROOT / "data" / "sample"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``main(argv)``, which must stop with exit code 2 and one ``error: ...`` line on stderr
    (no traceback); return that line."""
    from detr_ssl.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stopped.value.code == 2 and lines and "Traceback" not in err, err[-3000:]
    return lines[-1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (scripts are not a package) as module ``NAME``."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(scope="session")
def coco_images() -> list[torch.Tensor]:
    """Two real photos from the sample, normalised like the data pipeline does."""
    images = []
    for path in sorted((SAMPLE_ROOT / "train").glob("*.jpg"))[:2]:
        image = TF.to_dtype(TF.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
        images.append(TF.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    assert len(images) == 2, f"sample images missing under {SAMPLE_ROOT / 'train'}"
    return images


@pytest.fixture(scope="session")
def coco_batch() -> tuple[NestedTensor, list[dict]]:
    """Two sample training images with their targets, through the evaluation transforms at 160 px."""
    dataset = CocoDetection(SAMPLE_ROOT / "train", SAMPLE_ROOT / "annotations" / "instances_train.json",
                            transforms=build_transforms("val", min_size=160, max_size=224))
    return collate_fn([dataset[0], dataset[1]])


@pytest.fixture(scope="session")
def isaid_patches(tmp_path_factory) -> Path:
    """tests/fixtures/isaid_sample (P0005, 884x977, 131 objects) cut by scripts/prepare_isaid.py into
    six 512 px patches (overlap 128): the --dataset_file isaid layout, train split only."""
    out = tmp_path_factory.mktemp("isaid_patches")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_isaid.py"), "--src", str(FIXTURES / "isaid_sample"),
               "--out", str(out), "--patch", "512", "--overlap", "128", "--splits", "train"]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
    return out
