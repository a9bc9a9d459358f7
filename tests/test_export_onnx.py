"""scripts/export_onnx.py: tiny DETR and Deformable DETR exported to ONNX give PyTorch's outputs
on the sample images under onnxruntime, or no file; scripts/predict.py --onnx gives the
detections of predict.py with the checkpoint."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import load_script
from detr_ssl.engine.onnx_runtime import METADATA_KEY, OnnxDetect
from detr_ssl.engine.predict import SlidingWindowPredictor, TorchDetect, load_detector
from test_api import CATEGORIES, DEFORMABLE, SAMPLE_VAL, sample_images, tiny_checkpoint

onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install -e '.[export]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra: pip install -e '.[export]'")
export_onnx = load_script("export_onnx")
predict = load_script("predict")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {"detr": tiny_checkpoint(root / "detr.pth", []),
            "deformable_detr": tiny_checkpoint(root / "deformable.pth", DEFORMABLE)}


def export(capsys, checkpoint: Path, out: Path, *flags: str) -> tuple[int, dict]:
    status = export_onnx.main(["--resume", str(checkpoint), "--out", str(out), *flags])
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
@pytest.mark.parametrize("raw", [False, True])
def test_onnxruntime_gives_the_pytorch_outputs(checkpoints, model, raw, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    status, summary = export(capsys, checkpoints[model], out, *(["--raw"] if raw else []))
    assert status == 0 and out.is_file() and not summary["refused"]
    assert summary["model"] == model and summary["max_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == (["images", "mask"] if raw else ["images", "mask", "sizes"])
    assert [o.name for o in session.get_outputs()] == (["logits", "boxes"] if raw else ["boxes", "scores", "labels"])


@pytest.mark.parametrize(("model", "flags", "shapes"), [
    ("detr", [], [[2, 3, 128, 128], [3, 3, 128, 97]]),               # another size and batch
    ("detr", ["--raw"], [[2, 3, 128, 128], [3, 3, 128, 97]]),
    ("deformable_detr", [], [[2, 3, 128, 128], [3, 3, 128, 128]]),    # another batch only
    ("deformable_detr", ["--raw"], [[2, 3, 128, 128], [3, 3, 128, 128]]),
])
def test_dynamic_exports_run_at_other_shapes(checkpoints, model, flags, shapes, tmp_path, capsys):
    status, summary = export(capsys, checkpoints[model], tmp_path / "model.onnx", "--dynamic", *flags)
    assert status == 0 and [check["shape"] for check in summary["checks"]] == shapes
    assert all(check["max_diff"] <= 1e-4 for check in summary["checks"])


VIT = ["--backbone", "vit_tiny_patch16", "--pyramid_channels", "32", "--vit_window_size", "4"]


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
def test_vit_backbones_export_with_a_dynamic_batch_at_a_fixed_size(model, tmp_path, capsys):
    """Windows and the per-image position tables trace: the portrait and landscape sample images
    (different valid token grids in one padded batch) give PyTorch's outputs at two batch sizes."""
    pytest.importorskip("timm", reason="ViT backbones need the vit extra: pip install -e '.[vit]'")
    flags = [*VIT, *(DEFORMABLE if model == "deformable_detr" else [])]
    checkpoint = tiny_checkpoint(tmp_path / "vit.pth", flags)
    status, summary = export(capsys, checkpoint, tmp_path / "model.onnx", "--dynamic")
    assert status == 0 and summary["dynamic_batch"] and not summary["dynamic_size"]
    assert [check["shape"] for check in summary["checks"]] == [[2, 3, 128, 128], [3, 3, 128, 128]]
    assert all(check["max_diff"] <= 1e-4 for check in summary["checks"])


def metadata(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


def test_a_difference_above_the_tolerance_writes_no_file(checkpoints, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    status, summary = export(capsys, checkpoints["deformable_detr"], out, "--tolerance", "0")
    assert status == 1 and summary["refused"] and summary["max_diff"] > 0
    assert not list(tmp_path.iterdir())  # neither the file nor its partial export


def test_missing_packages_name_the_extra(monkeypatch, checkpoints, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    assert export_onnx.main(["--resume", str(checkpoints["detr"]), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pip install -e '.[export]'" in capsys.readouterr().err


# --- scripts/predict.py --onnx ------------------------------------------------------------------

def predictions(capsys, out: Path, *flags: str) -> list[dict]:
    """predict.py's detections of a portrait and a landscape sample image."""
    status = predict.main([*flags, "--images", *map(str, sample_images()[:2]), "--out", str(out), "--score_threshold",
                           "0", "--device", "cpu", "--no_draw"])
    assert status == 0, (out / "log.txt").read_text()[-2000:]
    capsys.readouterr()
    return json.loads((out / "predictions.json").read_text())


TILED = ["--window", "256", "--overlap", "64"]  # 9 windows of 256 px per image, resized to 128x128


@pytest.mark.parametrize(("model", "export_flags", "windows", "batch", "size"), [
    ("detr", ["--dynamic"], ["--window", "0"], None, None),   # whole 128x97 / 95x128 images, no padding
    ("detr", [], TILED, 2, [128, 128]),                       # batches of 4 windows in runs of 2, the last padded
    ("detr", ["--raw"], TILED, 2, [128, 128]),                # post-processed by the runner
    ("deformable_detr", [], TILED, 2, [128, 128]),
    ("deformable_detr", ["--raw", "--dynamic"], TILED, None, [128, 128]),
])
def test_predict_with_onnx_gives_the_detections_of_the_checkpoint(checkpoints, model, export_flags, windows, batch,
                                                                  size, tmp_path, capsys):
    graph = tmp_path / "model.onnx"
    assert export(capsys, checkpoints[model], graph, *export_flags)[0] == 0
    assert metadata(graph) == {"model": model, "min_size": 128, "max_size": 128, "num_classes": 5, "num_queries": 12,
                               "num_select": 100, "categories": {str(k): v for k, v in CATEGORIES.items()},
                               "raw": "--raw" in export_flags, "batch": batch, "size": size}
    expected = predictions(capsys, tmp_path / "torch", "--resume", str(checkpoints[model]), *windows)
    found = predictions(capsys, tmp_path / "onnx", "--onnx", str(graph), *windows)
    assert len(found) == len(expected) >= 10
    for ours, theirs in zip(found, expected):
        assert (ours["image_id"], ours["category_id"]) == (theirs["image_id"], theirs["category_id"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=0.05)  # px, of 640 px images; json rounds to 0.01
    names = json.loads((tmp_path / "onnx" / "images.json").read_text())["categories"]
    assert {c["id"]: c["name"] for c in names} == CATEGORIES


def test_a_fixed_size_graph_pads_each_input_bottom_right_into_its_size_and_batch(checkpoints, tmp_path, capsys):
    """Whole sample images (about 128x96 and 96x128) into Deformable DETR's 2x128x128 graph, three at
    once: PyTorch on the same inputs padded to 128x128 (a full-size input in the batch, dropped)."""
    graph = tmp_path / "model.onnx"
    assert export(capsys, checkpoints["deformable_detr"], graph)[0] == 0
    model, postprocess, _, _ = load_detector(checkpoints["deformable_detr"], "cpu", logging.getLogger("test"))
    detect = OnnxDetect(graph)
    prepare = SlidingWindowPredictor(detect, 128, 128, window=0).prepare
    pictures = [Image.open(path).convert("RGB") for path in sample_images()[:3]]
    inputs, sizes = [prepare(picture) for picture in pictures], [(p.height, p.width) for p in pictures]
    assert all(max(t.shape[1:]) == 128 > min(t.shape[1:]) for t in inputs)
    found = detect(inputs, sizes)
    padded = TorchDetect(model, postprocess)([*inputs, torch.zeros(3, 128, 128)], [*sizes, (128, 128)])[:3]
    unpadded = TorchDetect(model, postprocess)(inputs[:1], sizes[:1])
    assert len(found) == 3
    for ours, theirs in zip(found, padded):
        assert torch.equal(ours["labels"], theirs["labels"])
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-4)
        assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-3 * 640)
    assert not torch.allclose(found[0]["boxes"], unpadded[0]["boxes"], atol=1.0)  # why the padding must match


def test_predict_with_onnx_errors_name_what_to_do(checkpoints, tmp_path, capsys, monkeypatch):
    graph = tmp_path / "model.onnx"
    assert export(capsys, checkpoints["detr"], graph)[0] == 0
    with pytest.raises(SystemExit):
        predict.main(["--onnx", str(graph), "--resume", str(checkpoints["detr"]), "--images", str(SAMPLE_VAL)])
    assert "argument --resume: not allowed with argument --onnx" in capsys.readouterr().err

    def fails(name: str, proto=None) -> str:
        path = graph
        if proto is not None:
            path = tmp_path / f"{name}.onnx"
            onnx.save(proto, str(path))
        assert predict.main(["--onnx", str(path), "--images", str(SAMPLE_VAL), "--out", str(tmp_path / name),
                             "--window", "0", "--no_draw"]) == 1
        return (tmp_path / name / "log.txt").read_text()

    small = onnx.load(str(graph))
    entry = next(p for p in small.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "size": [96, 96]})
    assert ("does not fit the graph's fixed input of 96x96; export again with scripts/export_onnx.py --size 128 128"
            in fails("small", small))
    bare = onnx.load(str(graph))
    del bare.metadata_props[:]
    assert "no 'detr_ssl' metadata; export the checkpoint with scripts/export_onnx.py" in fails("bare", bare)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install -e '.[export]'" in fails("no_runtime")


def test_detector_from_onnx_gives_the_checkpoints_detections(checkpoints, tmp_path, capsys):
    """The Python API over a dynamic DETR graph: same boxes, scores, labels and class names as over
    the checkpoint, whole images and tiled."""
    from detr_ssl import Detector

    graph = tmp_path / "model.onnx"
    assert export(capsys, checkpoints["detr"], graph, "--dynamic")[0] == 0
    images = sample_images()[:3]
    for tile in (False, True):
        found = Detector.from_onnx(graph).predict(images, tile=tile, window=96, overlap=32)
        expected = Detector.from_checkpoint(checkpoints["detr"]).predict(images, tile=tile, window=96, overlap=32)
        for ours, theirs in zip(found, expected):
            assert torch.equal(ours.labels, theirs.labels) and ours.names == theirs.names
            torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.boxes, theirs.boxes, atol=0.05, rtol=0)
    assert set(Detector.from_onnx(graph).names.values()) == set(CATEGORIES.values())
