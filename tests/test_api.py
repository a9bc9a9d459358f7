"""detr_ssl.Detector: the Python API gives predict.py's detections for every kind of image input."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from detr_ssl import Detector
from detr_ssl.config import MODEL_DEFAULTS, build_parser
from detr_ssl.engine.predict import SlidingWindowPredictor, TorchDetect, load_detector
from detr_ssl.models import build_model
from detr_ssl.utils.errors import MissingFileError

SAMPLE_VAL = Path(__file__).resolve().parent.parent / "data" / "sample" / "val"
CATEGORIES = {1: "plane", 2: "ship", 3: "car", 4: "bridge"}
TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_norm", "batch",
        "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "128",
        "--num_queries", "12", "--min_size", "128", "--max_size", "128", "--num_classes", "5"]
DEFORMABLE = ["--model", "deformable_detr", "--with_box_refine", "--two_stage", "--num_feature_levels", "3",
              "--msda_backend", "pytorch"]


def detector_args(argv: list[str]):
    """The flags of a detector as a run saves them: parsed, the model's defaults filled in."""
    args = build_parser().parse_args(argv)
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def tiny_checkpoint(path: Path, flags: list[str]) -> Path:
    """A randomly initialised detector of TINY ``flags`` saved as a detection run saves it."""
    args = detector_args([*TINY, *flags])
    torch.manual_seed(0)
    model = build_model(args)[0]
    torch.save({"model": model.state_dict(), "args": vars(args), "categories": CATEGORIES}, path)
    return path


@pytest.fixture(scope="module", params=["detr", "deformable_detr"])
def checkpoint(request, tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("api") / "checkpoint.pth",
                           DEFORMABLE if request.param == "deformable_detr" else [])


def sample_images() -> list[Path]:
    return sorted(SAMPLE_VAL.glob("*.jpg"))


def assert_same(found, expected: dict[str, torch.Tensor]) -> None:
    assert torch.allclose(found.boxes, expected["boxes"], atol=1e-4)
    assert torch.allclose(found.scores, expected["scores"], atol=1e-6)
    assert torch.equal(found.labels, expected["labels"])


def test_detections_are_those_of_predict_py_whole_and_tiled(checkpoint):
    model, postprocess, args, _ = load_detector(checkpoint, "cpu", logging.getLogger("test"))
    detector = Detector.from_checkpoint(checkpoint, device="cpu", batch_size=3)
    paths = sample_images()
    found = detector.predict([str(path) for path in paths], score_threshold=0.01)
    detect = TorchDetect(model, postprocess)
    whole = SlidingWindowPredictor(detect, args.min_size, args.max_size, window=0, score_threshold=0.01)
    assert len(found) == len(paths) == 4
    for result, path in zip(found, paths):
        with Image.open(path) as image:
            assert_same(result, whole(image))
            assert (result.boxes[:, 2] <= image.width + 1e-3).all() and (result.boxes[:, 3] <= image.height + 1e-3).all()
        assert result.scores.tolist() == sorted(result.scores.tolist(), reverse=True)
    tiled = SlidingWindowPredictor(detect, args.min_size, args.max_size, window=256, overlap=64)
    with Image.open(paths[0]) as image:
        assert_same(detector.predict(paths[0], tile=True, window=256, overlap=64), tiled(image))


def test_every_input_kind_gives_the_same_detections_with_names_from_the_categories(checkpoint):
    detector = Detector.from_checkpoint(checkpoint)
    path = sample_images()[1]
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    inputs = [path, str(path), image, np.asarray(image), TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)]
    results = detector.predict(inputs)
    assert len(results[0]) > 0
    for result in results[1:]:
        assert_same(result, vars(results[0]))
    assert results[0].names == [CATEGORIES.get(label, str(label)) for label in results[0].labels.tolist()]
    assert set(results[0].names) <= {*CATEGORIES.values(), "0"}


def test_clear_errors_for_missing_files_and_wrong_inputs(checkpoint, tmp_path):
    with pytest.raises(MissingFileError, match=f"checkpoint {tmp_path / 'none.pth'}: no such file"):
        Detector.from_checkpoint(tmp_path / "none.pth")
    detector = Detector.from_checkpoint(checkpoint)
    with pytest.raises(MissingFileError, match=f"image {tmp_path / 'gone.jpg'}: no such file"):
        detector.predict([sample_images()[0], tmp_path / "gone.jpg"])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        detector.predict(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot detect in a int"):
        detector.predict(3)
