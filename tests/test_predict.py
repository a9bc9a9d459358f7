"""Inference on full-size images: the sliding-window grid, merging overlapping windows, and
scripts/predict.py and scripts/visualize.py end to end with a real checkpoint on a real iSAID image."""
from __future__ import annotations

import argparse
import json
import re
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert, box_iou

from conftest import load_script
from detr_ssl.__main__ import main as train_main
from detr_ssl.data.isaid import ISAID_CATEGORIES
from detr_ssl.data.tiling import BORDER_MARGIN, Window, merge_window_detections, sliding_windows
from detr_ssl.engine.predict import inference_args, load_detector
from detr_ssl.models.postprocess import PostProcess, PostProcessSigmoid

REPO_ROOT = Path(__file__).resolve().parent.parent
ISAID_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "isaid_sample" / "train"
P0005 = ISAID_FIXTURE / "images" / "P0005.png"  # 884x977, 131 vehicles
P0005_JSON = ISAID_FIXTURE / "instancesonly_filtered_train.json"
SAMPLE = REPO_ROOT / "data" / "sample"




predict = load_script("predict")
visualize = load_script("visualize")


# --- the grid -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "height", "size", "overlap"), [
    (1054, 1529, 800, 200), (884, 977, 512, 128), (884, 977, 400, 200), (500, 300, 800, 200), (1600, 801, 800, 0),
])
def test_sliding_windows_cover_every_pixel_and_shift_the_last_inwards(width, height, size, overlap):
    windows = sliding_windows(width, height, size, overlap)
    covered = np.zeros((height, width), dtype=bool)
    for window in windows:
        assert 0 <= window.x0 < window.x1 <= width and 0 <= window.y0 < window.y1 <= height
        assert (window.x1 - window.x0, window.y1 - window.y0) == (min(size, width), min(size, height))  # never padded
        covered[window.y0:window.y1, window.x0:window.x1] = True
    assert covered.all()
    assert max(w.x1 for w in windows) == width and max(w.y1 for w in windows) == height
    xs, ys = sorted({w.x0 for w in windows}), sorted({w.y0 for w in windows})
    assert len(windows) == len(xs) * len(ys)
    for starts in (xs, ys):  # neighbours overlap by at least `overlap`; only the last step may be shorter
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))


def test_sliding_windows_of_the_full_size_isaid_test_image():
    # P0006 of the iSAID sample is 1054x1529: 2 columns (0, 254: shifted in from 600) x 3 rows (0, 600, 729).
    windows = sliding_windows(1054, 1529, 800, 200)
    assert [(w.x0, w.y0) for w in windows] == [(0, 0), (254, 0), (0, 600), (254, 600), (0, 729), (254, 729)]


# --- merging ------------------------------------------------------------------------------------

def detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_an_object_straddling_a_window_border_is_found_once():
    # A 1400x800 image in two windows overlapping by 200 px: A = x 0..800, B = x 600..1400.
    windows = [Window(0, 0, 800, 800), Window(600, 0, 1400, 800)]
    left = detections(
        [[750, 100, 800, 160],    # car 750..850 cut by A's right edge: A sees 750..800, with the higher score
         [650, 300, 700, 340],    # car wholly inside the overlap: both windows see it whole
         [100, 500, 160, 540],    # car only A sees
         [760, 600, 800, 640]],   # a ship cut by A's edge, of a class B sees nothing of there
        [0.9, 0.7, 0.8, 0.6], [9, 9, 9, 1])
    right = detections(
        [[150, 100, 250, 160],    # the straddling car, whole (x 750..850 in the image)
         [50, 301, 100, 341],     # the overlap car again
         [140, 100, 250, 160]],   # a large vehicle at the straddling car's place: another class, kept
        [0.8, 0.75, 0.5], [9, 9, 8])
    merged = merge_window_detections([left, right], windows, 1400, 800)
    found = sorted(zip(merged["labels"].tolist(), merged["boxes"].round().tolist(), merged["scores"].tolist()))
    assert found == [
        (1, [760, 600, 800, 640], pytest.approx(0.6)),     # nothing covers it: kept although cut
        (8, [740, 100, 850, 160], pytest.approx(0.5)),
        (9, [100, 500, 160, 540], pytest.approx(0.8)),
        (9, [650, 301, 700, 341], pytest.approx(0.75)),    # the overlap car once, the better score
        (9, [750, 100, 850, 160], pytest.approx(0.8)),     # the straddling car once, whole, not the 0.9 part
    ]
    assert merged["scores"].tolist() == sorted(merged["scores"].tolist(), reverse=True)


def test_one_window_is_the_detector_output_unchanged():
    # Two boxes of one class with IoU 0.6 stay: only windows are merged, not the detector's own set.
    single = detections([[10, 10, 60, 60], [20, 10, 70, 60]], [0.5, 0.9], [3, 3])
    merged = merge_window_detections([single], [Window(100, 50, 400, 300)], 500, 400)
    assert merged["boxes"].tolist() == [[120, 60, 170, 110], [110, 60, 160, 110]]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.5])


def test_windows_cut_from_the_real_isaid_image_merge_back_to_its_objects():
    """An oracle detector on every 400 px window (overlap 200) of P0005 reports the visible part of
    each of the 131 objects; cut parts score higher than whole views. Merging must give back
    each object exactly once, with its whole box."""
    coco = json.loads(P0005_JSON.read_text())
    image = coco["images"][0]
    width, height = image["width"], image["height"]
    truth = box_convert(torch.tensor([a["bbox"] for a in coco["annotations"]], dtype=torch.float32), "xywh", "xyxy")
    labels = torch.tensor([a["category_id"] for a in coco["annotations"]])
    assert (truth[:, 2:] - truth[:, :2]).max() < 200 - 2 * BORDER_MARGIN  # every object fits in the overlap
    windows = sliding_windows(width, height, 400, 200)
    per_window, cut_parts = [], 0
    for window in windows:
        lo = torch.tensor([window.x0, window.y0] * 2, dtype=torch.float32)
        hi = torch.tensor([window.x1, window.y1] * 2, dtype=torch.float32)
        visible = torch.minimum(torch.maximum(truth, lo), hi)
        keep = ((visible[:, 2] - visible[:, 0]) > 0) & ((visible[:, 3] - visible[:, 1]) > 0)
        whole = (visible == truth).all(1)
        cut_parts += int((keep & ~whole).sum())
        scores = torch.where(whole, 0.6, 0.9)[keep]
        per_window.append({"boxes": (visible - lo)[keep], "scores": scores, "labels": labels[keep]})
    assert len(windows) == 16 and cut_parts > 50
    merged = merge_window_detections(per_window, windows, width, height)
    assert len(merged["boxes"]) == len(truth)
    iou = box_iou(truth, merged["boxes"])
    best = iou.argmax(1)
    assert iou.max(1).values.min() == pytest.approx(1.0) and len(set(best.tolist())) == len(truth)
    assert torch.equal(merged["labels"][best], labels)


# --- post-processing ------------------------------------------------------------------------------

@pytest.mark.parametrize("postprocess", [PostProcess(), PostProcessSigmoid(num_select=7)], ids=["softmax", "sigmoid"])
def test_batched_post_processing_gives_each_image_what_it_gets_alone(postprocess):
    """The batch-wise tensors (what the ONNX graph returns) are the per-image dicts, and an image's
    detections do not depend on the others of its batch."""
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 6, 5), "pred_boxes": torch.rand(3, 6, 4)}
    sizes = torch.tensor([[100, 200], [50, 60], [640, 481]])
    boxes, scores, labels = postprocess.batched(outputs, sizes)
    assert boxes.shape == (3, len(scores[0]), 4) and labels.shape == scores.shape
    for index, found in enumerate(postprocess(outputs, sizes)):
        alone = postprocess({key: value[index:index + 1] for key, value in outputs.items()}, sizes[index:index + 1])[0]
        for key, value in {"boxes": boxes, "scores": scores, "labels": labels}.items():
            assert torch.equal(found[key], value[index]) and torch.equal(alone[key], value[index])


# --- predict.py and visualize.py end to end -------------------------------------------------------

TINY = ["--device", "cpu", "--num_workers", "0", "--backbone", "resnet18", "--backbone_weights", "none",
        "--backbone_norm", "batch", "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "128", "--num_queries", "12", "--min_size", "128", "--max_size", "128",
        "--batch_size", "2", "--no-tensorboard"]


@pytest.fixture(scope="module")
def trained(isaid_patches, tmp_path_factory) -> Path:
    """A 1-iteration DETR run on the prepared iSAID patches (--dataset_file isaid): its output folder."""
    run = tmp_path_factory.mktemp("isaid_run")
    train_main([*TINY, "--dataset_file", "isaid", "--data_path", str(isaid_patches), "--val_split", "train",
                "--epochs", "1", "--limit_train_batches", "1", "--limit_val_batches", "1", "--output_dir", str(run)])
    return run


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_predict_on_the_full_size_isaid_image(trained, tmp_path, capsys):
    out = tmp_path / "predict"
    status = predict.main(["--resume", str(trained / "checkpoint.pth"), "--images", str(P0005), "--out", str(out),
                           "--window", "512", "--overlap", "128", "--score_threshold", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 0, captured.out[-2000:]
    summary = last_json_line(captured.out)
    assert summary["images"] == 1 and summary["detections"] > 0

    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == summary["detections"] <= 6 * 12  # 6 windows x 12 queries, merged
    for result in results:
        x, y, w, h = result["bbox"]
        assert result["image_id"] == 1 and 0 <= result["category_id"] <= 15 and 0 <= result["score"] <= 1
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= 884 + 1e-3 and y + h <= 977 + 1e-3
    images = json.loads((out / "images.json").read_text())
    assert images["images"] == [{"id": 1, "file_name": str(P0005), "width": 884, "height": 977}]
    assert {c["id"]: c["name"] for c in images["categories"]} == ISAID_CATEGORIES  # an iSAID checkpoint
    with Image.open(out / "P0005.png") as drawn, Image.open(P0005) as original:
        assert drawn.size == original.size
        assert not np.array_equal(np.asarray(drawn), np.asarray(original.convert("RGB")))  # boxes drawn
    assert "predicting 1 image(s)" in (out / "log.txt").read_text()


def test_predict_scores_full_images_against_their_json_and_visualize_draws_them(trained, tmp_path, capsys):
    out, vis = tmp_path / "predict", tmp_path / "vis"
    status = predict.main(["--resume", str(trained / "checkpoint.pth"), "--images", str(P0005.parent),
                           "--annotations", str(P0005_JSON), "--out", str(out), "--window", "512", "--overlap",
                           "128", "--score_threshold", "0", "--device", "cpu", "--no_draw",
                           "--area_ranges", "tiny=0:256,small=256:1024,rest=1024:inf"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP_tiny", "APs", "AP_rest", "AR_rest"} <= set(metrics)
    assert metrics["AP_tiny"] == -1.0  # no iSAID object in P0005 is under 256 px^2
    assert not list(out.glob("*.png"))
    capsys.readouterr()

    assert visualize.main(["--annotations", str(P0005_JSON), "--images", str(P0005.parent), "--results",
                           str(out / "predictions.json"), "--out", str(vis), "--score_threshold", "0"]) == 0
    assert last_json_line(capsys.readouterr().out)["images"] == 1
    with Image.open(vis / "P0005.png") as picture:
        assert picture.size == (2 * 884 + 8, 977)  # ground truth | predictions
    assert visualize.main(["--annotations", str(P0005_JSON), "--images", str(P0005.parent), "--results",
                           str(out / "predictions.json"), "--out", str(vis / "overlay"), "--overlay"]) == 0
    with Image.open(vis / "overlay" / "P0005.png") as picture:
        assert picture.size == (884, 977)


def test_visualize_patches_with_the_results_of_an_evaluation(trained, isaid_patches, tmp_path, capsys):
    annotations = isaid_patches / "annotations" / "instances_train.json"
    status = visualize.main(["--annotations", str(annotations), "--images", str(isaid_patches / "train"), "--results",
                             str(trained / "results_0000.json"), "--out", str(tmp_path), "--score_threshold", "0"])
    assert status == 0
    evaluated = {r["image_id"] for r in json.loads((trained / "results_0000.json").read_text())}
    assert len(list(tmp_path.glob("P0005_*.png"))) == len(evaluated) == 2  # --limit_val_batches 1, batch 2

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 99, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.9}]))
    assert visualize.main(["--annotations", str(annotations), "--images", str(isaid_patches / "train"), "--results",
                           str(wrong), "--out", str(tmp_path)]) == 1
    assert "detection 0 is of image id 99" in capsys.readouterr().err


def test_predict_errors_name_what_is_wrong(trained, tmp_path, capsys):
    checkpoint = str(trained / "checkpoint.pth")
    assert predict.main(["--resume", checkpoint, "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path),
                         "--device", "cpu"]) == 1
    assert f"--images {tmp_path / 'nowhere'}: no such file or folder" in (tmp_path / "log.txt").read_text()
    broken = tmp_path / "broken.png"
    broken.write_bytes(P0005.read_bytes()[:4000])  # a truncated PNG
    assert predict.main(["--resume", checkpoint, "--images", str(broken), "--out", str(tmp_path / "a"),
                         "--device", "cpu", "--window", "0"]) == 1
    assert f"cannot read image {broken}" in (tmp_path / "a" / "log.txt").read_text()
    assert predict.main(["--resume", checkpoint, "--images", str(broken), str(P0005), "--out", str(tmp_path / "b"),
                         "--device", "cpu", "--window", "0", "--skip_bad_samples"]) == 0
    assert last_json_line(capsys.readouterr().out)["skipped"] == 1
    assert "skipped 1 unreadable image(s)" in (tmp_path / "b" / "log.txt").read_text()
    with pytest.raises(SystemExit):
        predict.main(["--resume", checkpoint, "--images", str(P0005), "--window", "100", "--overlap", "100"])
    assert "--overlap < --window" in capsys.readouterr().err


def test_checkpoints_without_our_args_and_pretraining_checkpoints(trained, tmp_path):
    checkpoint = torch.load(trained / "checkpoint.pth", weights_only=True)
    # Official DETR checkpoints hold an argparse.Namespace without 'model' or 'num_classes'.
    official_args = {k: v for k, v in checkpoint["args"].items() if k not in ("model", "num_classes")}
    args = inference_args({"model": checkpoint["model"], "args": argparse.Namespace(**official_args)}, "cpu")
    assert args.model == "detr" and args.num_classes == 16 and args.num_queries == 12
    assert args.backbone_weights == "none" and args.ssl_task == "none"  # nothing downloaded, no pretext head

    pretrained = tmp_path / "pretrain.pth"
    torch.save({"model": checkpoint["model"], "args": {**checkpoint["args"], "ssl_mode": "pretrain"}}, pretrained)
    with pytest.raises(ValueError, match="pre-training checkpoint .* Fine-tune it first"):
        load_detector(pretrained, "cpu", logging.getLogger("test"))


def test_checkpoints_keep_the_category_names_for_predict_after_the_data_has_gone(tmp_path, capsys):
    """A COCO-json run saves its categories; predict.py names the classes from them even when the
    training annotations are no longer where the checkpoint says."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(SAMPLE, data, ignore=shutil.ignore_patterns("unlabelled"))
    train_main([*TINY, "--data_path", str(data), "--val_split", "train", "--epochs", "1", "--limit_train_batches",
                "1", "--limit_val_batches", "1", "--output_dir", str(run)])
    annotations = json.loads((SAMPLE / "annotations" / "instances_train.json").read_text())
    expected = {c["id"]: c["name"] for c in annotations["categories"]}
    assert torch.load(run / "checkpoint.pth", weights_only=True)["categories"] == expected
    shutil.rmtree(data)

    image = next((SAMPLE / "val").glob("*.jpg"))
    out = tmp_path / "predict"
    assert predict.main(["--resume", str(run / "checkpoint.pth"), "--images", str(image), "--out", str(out),
                         "--window", "0", "--device", "cpu", "--no_draw"]) == 0
    assert {c["id"]: c["name"] for c in json.loads((out / "images.json").read_text())["categories"]} == expected


def test_predict_that_keeps_no_detection_says_how_many_the_threshold_dropped(trained, tmp_path, capsys):
    out = tmp_path / "predict"
    status = predict.main(["--resume", str(trained / "checkpoint.pth"), "--images", str(P0005), "--out", str(out),
                           "--window", "0", "--score_threshold", "1", "--device", "cpu", "--no_draw"])
    capsys.readouterr()
    assert status == 0
    log = (out / "log.txt").read_text()
    assert re.search(r"kept 0 detections: all \d+ were below --score_threshold 1 \(lower it", log), log[-2000:]
