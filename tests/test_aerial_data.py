"""Aerial data: scripts/prepare_isaid.py and scripts/dota_to_coco.py (patch grid, clipping rule,
real iSAID sample, DOTA parsing and checks), --dataset_file isaid, dense and small-object
evaluation (--max_dets, --area_ranges), and bad input with and without --skip_bad_samples."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from conftest import cli_error, load_script
from detr_ssl.__main__ import main as train_main
from detr_ssl.config import COCO_AREA_RANGES, parse_area_ranges, parse_args
from detr_ssl.data import build_dataset, num_classes_of
from detr_ssl.data.bad_samples import BadSampleError, skipped_in
from detr_ssl.data.coco import CocoDetection
from detr_ssl.data.isaid import ISAID_CATEGORIES, ISAID_NUM_CLASSES, IsaidDetection
from detr_ssl.data.tiling import Window, sliding_windows, window_origins
from detr_ssl.engine.evaluate import coco_bbox_stats, stat_names, tensorboard_metrics, to_coco_results

REPO_ROOT = Path(__file__).resolve().parent.parent
ISAID_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "isaid_sample"  # P0005 (train) of the shared sample

# pycocotools' mask.decode trips a numpy 2 deprecation inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")




prepare_isaid = load_script("prepare_isaid")
dota_to_coco = load_script("dota_to_coco")


# --- patch grid (detr_ssl.data.tiling, shared with scripts/predict.py) ------------------------------

@pytest.mark.parametrize(("length", "patch", "overlap", "origins"), [
    (1600, 800, 200, [0, 600, 800]),      # last window shifted inwards from 1200 to 800
    (1400, 800, 200, [0, 600]),           # exact multiple: no extra window
    (2000, 800, 200, [0, 600, 1200]),     # exact multiple with three windows
    (800, 800, 200, [0]),
    (500, 800, 200, [0]),                 # smaller than the patch: one window of the image length
    (884, 512, 128, [0, 372]),
    (977, 512, 128, [0, 384, 465]),
    (801, 800, 0, [0, 1]),
])
def test_patch_origins(length, patch, overlap, origins):
    assert window_origins(length, patch, overlap) == origins


@pytest.mark.parametrize(("patch", "overlap"), [(800, 200), (512, 128), (100, 0), (64, 63)])
def test_patch_grid_covers_every_pixel_without_padding(patch, overlap):
    for length in [*range(1, 400, 7), 799, 800, 801, 1400, 1401, 2999]:
        origins = window_origins(length, patch, overlap)
        size = min(patch, length)
        covered = np.zeros(length, dtype=bool)
        for start in origins:
            assert 0 <= start and start + size <= length
            covered[start:start + size] = True
        assert covered.all(), (length, origins)
        assert origins == sorted(set(origins)) and origins[-1] + size == length
        assert all(b - a <= patch - overlap for a, b in zip(origins, origins[1:]))  # at least the overlap


def test_patch_windows_and_bad_arguments():
    windows = sliding_windows(1000, 300, 800, 200)
    assert windows == [Window(0, 0, 800, 300), Window(200, 0, 1000, 300)]
    for patch, overlap in [(0, 0), (800, 800), (800, -1)]:
        with pytest.raises(ValueError, match="overlap < size"):
            window_origins(1000, patch, overlap)


# --- clipping one instance ----------------------------------------------------------------------

def box_ann(x, y, w, h, **extra):
    return {"id": 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, **extra}


def test_clip_box_inside_straddling_and_outside():
    window = Window(50, 0, 100, 100)
    inside = prepare_isaid.clip_instance(box_ann(60, 10, 20, 10), window, 0.5)
    assert inside == {"bbox": [10, 10, 20, 10], "area": 200, "iscrowd": 0}
    half = box_ann(90, 30, 20, 10)  # x 90..110: half of it lies in the window
    assert prepare_isaid.clip_instance(half, window, 0.5) == {"bbox": [40, 30, 10, 10], "area": 100.0, "iscrowd": 0}
    assert prepare_isaid.clip_instance(half, window, 0.6) is None
    quarter = box_ann(95, 30, 20, 10)  # x 95..115: a quarter inside
    assert prepare_isaid.clip_instance(quarter, window, 0.5) is None
    assert prepare_isaid.clip_instance(quarter, window, 0.25)["bbox"] == [45, 30, 5, 10]
    left_edge = box_ann(40, 0, 20, 10)  # straddles the window's left and top edges
    assert prepare_isaid.clip_instance(left_edge, window, 0.5)["bbox"] == [0, 0, 10, 10]
    assert prepare_isaid.clip_instance(box_ann(0, 0, 50, 10), window, 0.0) is None  # touches, no area
    assert prepare_isaid.clip_instance(box_ann(120, 0, 5, 5), window, 0.0) is None


def test_clip_polygon_gives_a_tighter_box():
    # A diamond |x-50| + |y-50| <= 10 (area 200), cut at x = 45: the tip is a triangle of area 25.
    diamond = box_ann(40, 40, 20, 20, segmentation=[[50, 40, 60, 50, 50, 60, 40, 50]], area=200)
    window = Window(0, 0, 45, 100)
    clipped = prepare_isaid.clip_instance(diamond, window, 0.1)
    assert clipped["bbox"] == [40, 45, 5, 10]  # the clipped bbox would be [40, 40, 5, 20]
    assert clipped["area"] == 25.0
    points = np.array(clipped["segmentation"][0]).reshape(-1, 2)
    assert prepare_isaid.polygon_area(points) == 25.0
    assert points[:, 0].max() == 45 and points[:, 0].min() == 40
    assert prepare_isaid.clip_instance(diamond, window, 0.2) is None
    shifted = prepare_isaid.clip_instance(diamond, Window(30, 35, 130, 135), 0.5)  # wholly inside
    assert shifted == {"bbox": [10, 5, 20, 20], "area": 200, "iscrowd": 0,
                       "segmentation": [[20, 5, 30, 15, 20, 25, 10, 15]]}


def test_clip_polygon_keeps_isaid_pixel_centre_margins():
    # iSAID: polygons through boundary-pixel centres, bbox 1 px wider on the right and bottom.
    square = box_ann(10, 10, 10, 10, segmentation=[[10, 10, 19, 10, 19, 19, 10, 19]], area=100)
    clipped = prepare_isaid.clip_instance(square, Window(15, 0, 100, 100), 0.4)
    assert clipped["bbox"] == [0, 10, 5, 10]  # x 15..19 widened to 20, patch origin 15
    assert clipped["area"] == pytest.approx(100 * 4 / 9, abs=0.01)
    right = prepare_isaid.clip_instance(square, Window(0, 0, 15, 100), 0.4)
    assert right["bbox"] == [10, 10, 5, 10]  # widened to 16 but cut at the patch edge 15


def test_clip_rle_mask():
    mask = np.zeros((20, 30), dtype=np.uint8, order="F")
    mask[5:10, 10:20] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    ann = box_ann(10, 5, 10, 5, segmentation=rle, area=50, iscrowd=1)
    clipped = prepare_isaid.clip_instance(ann, Window(15, 0, 30, 20), 0.5)
    assert clipped["bbox"] == [0, 5, 5, 5] and clipped["area"] == 25.0 and clipped["iscrowd"] == 1
    assert np.array_equal(mask_utils.decode(clipped["segmentation"]), mask[:, 15:30])
    assert prepare_isaid.clip_instance(ann, Window(17, 0, 30, 20), 0.5) is None


# --- the real sample ----------------------------------------------------------------------------

@pytest.fixture()
def isaid_src(tmp_path) -> Path:
    src = tmp_path / "isaid"
    shutil.copytree(ISAID_FIXTURE, src)
    return src


def run_prepare(capsys, *argv: str) -> tuple[int, dict | None]:
    status = prepare_isaid.main(list(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    return status, json.loads(lines[-1]) if status == 0 else None


def rasterised(segmentation: list, width: int, height: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))


def test_prepare_isaid_sample(isaid_src, tmp_path, capsys):
    out = tmp_path / "patches"
    argv = ["--src", str(isaid_src), "--out", str(out), "--patch", "512", "--overlap", "128", "--splits", "train"]
    status, summary = run_prepare(capsys, *argv)
    assert status == 0
    source = json.loads((isaid_src / "train" / "instancesonly_filtered_train.json").read_text())
    prepared = json.loads((out / "annotations" / "instances_train.json").read_text())
    counts = summary["train"]
    assert counts == {"images": 1, "patches": 6, "patches_written": 6, "source_instances": 131,
                      "instances_kept": len(prepared["annotations"]), "instances_dropped": counts["instances_dropped"],
                      "instances_in_no_patch": 0}
    assert counts["instances_kept"] > 131 and counts["instances_dropped"] > 0
    assert prepared["categories"] == source["categories"]

    coco = COCO(str(out / "annotations" / "instances_train.json"))
    assert sorted(coco.imgs) == list(range(1, 7)) and sorted(coco.anns) == list(range(1, counts["instances_kept"] + 1))
    with Image.open(isaid_src / "train" / "images" / "P0005.png") as full:
        full_pixels = np.asarray(full)
    for image in prepared["images"]:
        x0, y0, w, h = image["x0"], image["y0"], image["width"], image["height"]
        assert image["file_name"] == f"P0005_{x0}_{y0}.png" and (w, h) == (512, 512)
        with Image.open(out / "train" / image["file_name"]) as patch:
            assert np.array_equal(np.asarray(patch), full_pixels[y0:y0 + h, x0:x0 + w])

    sources = {ann["id"]: ann for ann in source["annotations"]}
    images = {image["id"]: image for image in prepared["images"]}
    whole = set()
    for ann in prepared["annotations"]:
        image, original = images[ann["image_id"]], sources[ann["source_annotation_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        assert ann["category_id"] == original["category_id"] and ann["iscrowd"] == original["iscrowd"]
        ox, oy, ow, oh = original["bbox"]
        if [ox - image["x0"], oy - image["y0"], ow, oh] == ann["bbox"]:
            whole.add(original["id"])
            assert ann["area"] == original["area"]
            continue
        # Truncated: the kept fraction agrees with the rasterised polygon, and is >= min_area_frac.
        fraction = ann["area"] / original["area"]
        mask = rasterised(original["segmentation"], 884, 977)
        in_patch = mask[image["y0"]:image["y0"] + 512, image["x0"]:image["x0"] + 512].sum() / mask.sum()
        assert fraction >= 0.5 and fraction == pytest.approx(in_patch, abs=0.05)
    assert whole == set(sources)  # every object is smaller than the overlap, so one patch holds it whole

    dataset = CocoDetection(out / "train", out / "annotations" / "instances_train.json",
                            transforms=lambda image, target: (image, target))
    assert len(dataset) == 6 and dataset[0][0].size == (512, 512)

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    json_bytes = (out / "annotations" / "instances_train.json").read_bytes()
    status, again = run_prepare(capsys, *argv)
    assert status == 0 and again["train"] == {**counts, "patches_written": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == mtimes
    assert (out / "annotations" / "instances_train.json").read_bytes() == json_bytes


def test_prepare_isaid_rewrites_a_wrong_patch_and_reads_the_test_split(isaid_src, tmp_path, capsys):
    test_dir = isaid_src / "test"
    (test_dir / "images").mkdir(parents=True)
    Image.new("RGB", (600, 300), "gray").save(test_dir / "images" / "T1.png")
    categories = json.loads((isaid_src / "train" / "instancesonly_filtered_train.json").read_text())["categories"]
    info = {"images": [{"id": 1, "file_name": "T1.png", "width": 600, "height": 300}], "categories": categories}
    (test_dir / "image_info_test.json").write_text(json.dumps(info))
    out = tmp_path / "patches"
    (out / "test").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(out / "test" / "T1_88_0.png")  # a leftover of the wrong size
    status, summary = run_prepare(capsys, "--src", str(isaid_src), "--out", str(out), "--patch", "512",
                                  "--overlap", "128", "--splits", "test")
    assert status == 0 and summary["test"]["patches"] == summary["test"]["patches_written"] == 2
    prepared = json.loads((out / "annotations" / "instances_test.json").read_text())
    assert prepared["annotations"] == [] and prepared["categories"] == categories
    with Image.open(out / "test" / "T1_88_0.png") as patch:
        assert patch.size == (512, 300)
    assert not list(out.rglob("*.tmp"))


def test_prepare_isaid_errors_name_the_file_and_record(isaid_src, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(prepare_isaid.DataError, match="split folder not found: .*val"):
        prepare_isaid.prepare_split(isaid_src, out, "val", 512, 128, 0.5)
    (isaid_src / "val").mkdir()
    with pytest.raises(prepare_isaid.DataError, match="instancesonly_filtered_val.json and .*image_info_val.json"):
        prepare_isaid.prepare_split(isaid_src, out, "val", 512, 128, 0.5)

    json_path = isaid_src / "train" / "instancesonly_filtered_train.json"
    coco = json.loads(json_path.read_text())
    coco["annotations"][3]["bbox"] = [870, 10, 30, 20]  # past the 884 px wide image
    json_path.write_text(json.dumps(coco))
    with pytest.raises(prepare_isaid.DataError, match=r"annotation id 4 \(image P0005.png\).*outside the 884x977"):
        prepare_isaid.prepare_split(isaid_src, out, "train", 512, 128, 0.5)

    (isaid_src / "train" / "images" / "P0005.png").unlink()
    coco["annotations"][3]["bbox"] = [800, 10, 30, 20]
    json_path.write_text(json.dumps(coco))
    assert prepare_isaid.main(["--src", str(isaid_src), "--out", str(out), "--splits", "train"]) == 1
    assert "image file missing: " in capsys.readouterr().err


# --- DOTA ---------------------------------------------------------------------------------------

HAND_LABELS = """imagesource:GoogleEarth
gsd:0.146343590398
10 20 50 20 50 60 10 60 plane 0
100.5 5 130 15 120 45 90.5 35 small-vehicle 1

-5 70 30 70 30 90 -5 90 ship 0
150 10 190 10 190 30 150 30 harbor
"""


def make_dota(root: Path, labels: dict[str, str | None]) -> tuple[Path, Path]:
    """images/ and labelTxt/ with a 200x80 image per name; None: an image without a label file."""
    images, label_dir = root / "images", root / "labelTxt"
    images.mkdir(parents=True)
    label_dir.mkdir()
    for name, text in labels.items():
        Image.new("RGB", (200, 80)).save(images / f"{name}.png")
        if text is not None:
            (label_dir / f"{name}.txt").write_text(text)
    return images, label_dir


def test_dota_hand_made_labels(tmp_path):
    images, labels = make_dota(tmp_path, {"P0001": HAND_LABELS})
    coco, problems, counts = dota_to_coco.convert(images, labels, dota_to_coco.load_classes(None))
    boxes = [(ann["category_id"], ann["bbox"], ann["difficult"]) for ann in coco["annotations"]]
    assert boxes == [(1, [10, 20, 40, 40], 0), (11, [90.5, 5, 39.5, 40], 1), (2, [0, 70, 30, 10], 0),
                     (8, [150, 10, 40, 20], 0)]
    assert coco["images"] == [{"id": 1, "file_name": "P0001.png", "width": 200, "height": 80}]
    assert [c["name"] for c in coco["categories"]] == dota_to_coco.DOTA_V1_CLASSES
    assert [str(p) for p in problems] == [f"warning: {labels / 'P0001.txt'}:6: corner outside the 200x80 image in "
                                          "(-5.0, 70.0, 30.0, 70.0, 30.0, 90.0, -5.0, 90.0); box clipped to the image"]
    assert counts == {"images": 1, "label_files": 1, "objects": 4, "difficult": 1, "skipped_difficult": 0}
    coco, _, counts = dota_to_coco.convert(images, labels, dota_to_coco.load_classes(None), skip_difficult=True)
    assert [ann["category_id"] for ann in coco["annotations"]] == [1, 2, 8] and counts["skipped_difficult"] == 1


def test_dota_check_names_every_problem(tmp_path, capsys):
    images, labels = make_dota(tmp_path, {
        "good": "imagesource:GoogleEarth\n10 20 50 20 50 60 10 60 plane 0\n",
        "bad": "10 20 50 20 50 60 10 60 container-crane 0\n1 2 3 plane 0\n300 10 310 10 310 20 300 20 ship 0\n",
        "empty": "imagesource:GoogleEarth\ngsd:null\n",
        "unlabelled": None,
    })
    (labels / "orphan.txt").write_text("10 20 50 20 50 60 10 60 plane 0\n")
    out = tmp_path / "train.json"
    status = dota_to_coco.main(["--images", str(images), "--labels", str(labels), "--out", str(out), "--check"])
    captured = capsys.readouterr()
    assert status == 1 and not out.exists()
    assert f"error: {labels / 'bad.txt'}:1: unknown class 'container-crane'" in captured.err
    assert f"error: {labels / 'bad.txt'}:2: malformed line '1 2 3 plane 0'" in captured.err
    assert f"error: {labels / 'bad.txt'}:3: box of " in captured.err
    assert f"warning: {labels / 'empty.txt'}: empty label file" in captured.err
    assert f"warning: {images / 'unlabelled.png'}: image without a label file" in captured.err
    assert f"warning: {labels / 'orphan.txt'}: label file without an image" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["errors"] == 3 and summary["warnings"] == 3 and summary["out"] is None

    (labels / "bad.txt").unlink()
    assert dota_to_coco.main(["--images", str(images), "--labels", str(labels), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["annotations"]) == 1  # harmless problems are not errors
    assert dota_to_coco.main(["--images", str(images), "--labels", str(labels), "--out", str(out), "--check"]) == 1
    for path in (labels / "empty.txt", labels / "orphan.txt", images / "empty.png", images / "unlabelled.png",
                 images / "bad.png"):
        path.unlink()
    assert dota_to_coco.main(["--images", str(images), "--labels", str(labels), "--out", str(out), "--check"]) == 0


def test_dota_round_trip_on_the_isaid_sample(tmp_path, capsys):
    """iSAID's boxes -> DOTA lines (the box corners) -> COCO json: the same boxes and classes."""
    source = json.loads((ISAID_FIXTURE / "train" / "instancesonly_filtered_train.json").read_text())
    images, labels = tmp_path / "images", tmp_path / "labelTxt"
    images.mkdir()
    labels.mkdir()
    shutil.copy(ISAID_FIXTURE / "train" / "images" / "P0005.png", images)
    names = {c["id"]: c["name"] for c in source["categories"]}
    lines = ["imagesource:GoogleEarth", "gsd:0.13"]
    for ann in source["annotations"]:
        x, y, w, h = ann["bbox"]
        corners = [x, y, x + w, y, x + w, y + h, x, y + h]
        lines.append(" ".join(map(str, corners)) + f" {names[ann['category_id']]} 0")
    (labels / "P0005.txt").write_text("\n".join(lines) + "\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names[i] for i in sorted(names)) + "\n")
    out = tmp_path / "instances_train.json"
    status = dota_to_coco.main(["--images", str(images), "--labels", str(labels), "--out", str(out),
                                "--classes", str(classes), "--check"])
    assert status == 0, capsys.readouterr().err
    converted = json.loads(out.read_text())
    assert converted["images"][0] == {"id": 1, "file_name": "P0005.png", "width": 884, "height": 977}
    assert [c["id"] for c in converted["categories"]] == [c["id"] for c in source["categories"]]
    assert [(a["category_id"], a["bbox"]) for a in converted["annotations"]] == \
        [(a["category_id"], a["bbox"]) for a in source["annotations"]]


def test_dota_class_orders_and_versions():
    website, devkit = dota_to_coco.load_classes(None), dota_to_coco.load_classes(None, "devkit")
    assert website == dota_to_coco.DOTA_V1_CLASSES and sorted(website) == sorted(devkit)
    # wordname_15 of CAPTAIN-WHU/DOTA_devkit's DOTA2COCO.py
    assert devkit == ["plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle",
                      "ship", "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout",
                      "harbor", "swimming-pool", "helicopter"]
    for order, v1 in (("website", website), ("devkit", devkit)):
        assert dota_to_coco.load_classes("dota1.0", order) == v1
        assert dota_to_coco.load_classes("dota1.5", order) == [*v1, "container-crane"]
        assert dota_to_coco.load_classes("dota2.0", order) == [*v1, "container-crane", "airport", "helipad"]


def test_dota_class_order_sets_the_ids_and_is_named_in_the_output(tmp_path, capsys):
    images, labels = make_dota(tmp_path, {"P0001": HAND_LABELS})
    out = tmp_path / "train.json"
    argv = ["--images", str(images), "--labels", str(labels), "--out", str(out)]
    for flags, order in (([], "website"), (["--class_order", "devkit"], "devkit")):
        assert dota_to_coco.main([*argv, *flags]) == 0
        coco = json.loads(out.read_text())
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert coco["info"]["class_order"] == summary["class_order"] == order
        names = {c["id"]: c["name"] for c in coco["categories"]}
        assert [names[a["category_id"]] for a in coco["annotations"]] == \
            ["plane", "small-vehicle", "ship", "harbor"]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 5, 7, 13]  # devkit ids
    with pytest.raises(SystemExit):
        dota_to_coco.main([*argv, "--class_order", "devkit", "--classes", "plane,ship"])
    assert "--class_order orders the built-in lists" in capsys.readouterr().err


def test_dota_v15_class_is_refused_naming_the_version_then_converted(tmp_path, capsys):
    images, labels = make_dota(tmp_path, {"P0001": "10 20 50 20 50 60 10 60 container-crane 0\n"})
    out = tmp_path / "train.json"
    argv = ["--images", str(images), "--labels", str(labels), "--out", str(out)]
    assert dota_to_coco.main(argv) == 1 and not out.exists()
    assert "unknown class 'container-crane'" in capsys.readouterr().err
    assert "a DOTA 1.5 class: use --classes dota1.5" in str(dota_to_coco.parse_label_file(
        labels / "P0001.txt", dota_to_coco.load_classes(None))[1][0])
    assert dota_to_coco.main([*argv, "--classes", "dota1.5", "--class_order", "devkit"]) == 0
    assert json.loads(out.read_text())["annotations"][0]["category_id"] == 16


def test_dota_pointed_at_the_wrong_folder_fails_and_writes_nothing(tmp_path, capsys):
    images, labels = make_dota(tmp_path, {"P0001": None, "P0002": None, "P0003": None})
    xml = tmp_path / "Annotations"
    xml.mkdir()
    for name in ("P0001", "P0002", "P0003"):
        (xml / f"{name}.xml").write_text("<annotation><object><name>plane</name></object></annotation>")
    out = tmp_path / "train.json"
    assert dota_to_coco.main(["--images", str(images), "--labels", str(xml), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"error: {xml}: no objects found: found 3 .xml files in --labels: these look like Pascal-VOC " \
           "annotations; use scripts/voc_to_coco.py" in captured.err
    assert not out.exists() and json.loads(captured.out.strip().splitlines()[-1])["out"] is None
    (labels / "P0001.txt").write_text(HAND_LABELS)  # 2 of 3 images without a label file
    argv = ["--images", str(images), "--labels", str(labels), "--out", str(out)]
    assert dota_to_coco.main(argv) == 1 and not out.exists()
    assert "2 of 3 images have no .txt file in --labels" in capsys.readouterr().err
    assert dota_to_coco.main([*argv, "--allow_unlabelled"]) == 0 and out.exists()


# --- --dataset_file isaid -----------------------------------------------------------------------

def isaid_args(root: Path, *flags: str):
    return parse_args(["--dataset_file", "isaid", "--data_path", str(root), "--min_size", "128", "--max_size", "128",
                       "--no-augment", *flags])


def copy_patches(isaid_patches: Path, tmp_path: Path, edit=None) -> Path:
    root = tmp_path / "patches"
    shutil.copytree(isaid_patches, root)
    if edit is not None:
        ann_file = root / "annotations" / "instances_train.json"
        coco = json.loads(ann_file.read_text())
        edit(coco)
        ann_file.write_text(json.dumps(coco))
    return root


def test_isaid_dataset_file_reads_the_prepared_sample(isaid_patches):
    dataset = build_dataset("train", isaid_args(isaid_patches))
    assert isinstance(dataset, IsaidDetection) and len(dataset) == 6
    assert num_classes_of(dataset) == ISAID_NUM_CLASSES == 16
    assert {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]} == ISAID_CATEGORIES
    image, target = dataset[0]
    assert image.shape == (3, 128, 128) and set(target["labels"].tolist()) <= {8, 9}  # vehicles
    assert sum(len(dataset[i][1]["labels"]) for i in range(len(dataset))) == len(dataset.coco.anns)


def test_isaid_subset_of_categories_is_fine_and_still_has_16_classes(isaid_patches, tmp_path):
    root = copy_patches(isaid_patches, tmp_path,
                        lambda coco: coco.update(categories=[c for c in coco["categories"] if c["id"] in (8, 9)]))
    assert num_classes_of(build_dataset("train", isaid_args(root))) == 16


@pytest.mark.parametrize("edit, found", [
    (lambda coco: coco["categories"][7].update(name="large-vehicle"), "id 8 'large-vehicle'"),  # DOTA spelling
    (lambda coco: coco["categories"].append({"id": 16, "name": "container_crane"}), "id 16 'container_crane'"),
    (lambda coco: coco.update(categories=[]), "no categories listed"),
])
def test_isaid_refuses_other_categories(isaid_patches, tmp_path, edit, found):
    root = copy_patches(isaid_patches, tmp_path, edit)
    with pytest.raises(ValueError) as error:
        build_dataset("train", isaid_args(root))
    message = str(error.value)
    assert "instances_train.json: --dataset_file isaid expects the official iSAID categories" in message
    assert "1 ship, 2 storage_tank" in message and found in message and "scripts/prepare_isaid.py" in message


def test_coco_json_of_other_data_is_refused_as_isaid(sample_root):
    with pytest.raises(ValueError, match=r"instances_val\.json: --dataset_file isaid expects .*id 1 'person'"):
        build_dataset("val", isaid_args(sample_root))


# --- dense scenes and size ranges in COCOeval ---------------------------------------------------

LOGGER = logging.getLogger("test_aerial_data")


def p0005_ground_truth() -> tuple[COCO, list[dict]]:
    """The 131 objects of P0005 as COCO ground truth, and as perfect detections (scores falling)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ISAID_FIXTURE / "train" / "instancesonly_filtered_train.json"))
    detections = [{"image_id": 1, "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1 - i / 1000}
                  for i, ann in enumerate(coco.dataset["annotations"])]
    return coco, detections


def test_more_than_100_objects_per_image_count_only_with_max_dets_above_them():
    coco, detections = p0005_ground_truth()
    assert len(detections) == 131
    detection = {"boxes": box_convert(torch.tensor([d["bbox"] for d in detections]), "xywh", "xyxy"),
                 "scores": torch.tensor([d["score"] for d in detections]),
                 "labels": torch.tensor([d["category_id"] for d in detections])}
    # The evaluation keeps the --max_dets best boxes of each image...
    kept = to_coco_results(1, detection, 100)
    assert len(kept) == 100 and len(to_coco_results(1, detection, 1000)) == 131
    stats, _ = coco_bbox_stats(coco, {1: kept}, 100, LOGGER)
    capped = dict(zip(stat_names(100), stats))
    found = Counter(d["category_id"] for d in detections[:100])
    total = Counter(ann["category_id"] for ann in coco.dataset["annotations"])
    assert capped["AR100"] == pytest.approx(np.mean([found[c] / total[c] for c in total]), abs=1e-3)
    stats, _ = coco_bbox_stats(coco, {1: to_coco_results(1, detection, 300)}, 300, LOGGER)
    dense = dict(zip(stat_names(300), stats))
    assert dense["AR300"] == pytest.approx(1.0) and dense["AP"] == pytest.approx(1.0)

    # ...and COCOeval's maxDets caps the boxes of each image and category: 131 cars of one class.
    for record in (*coco.dataset["annotations"], *detections):
        record["category_id"] = 9
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    stats, _ = coco_bbox_stats(coco, {1: detections}, 100, LOGGER)
    assert dict(zip(stat_names(100), stats))["AR100"] == pytest.approx(100 / 131, abs=1e-3)
    stats, _ = coco_bbox_stats(coco, {1: detections}, 1000, LOGGER)
    assert dict(zip(stat_names(1000), stats))["AR1000"] == pytest.approx(1.0)


def test_area_ranges_set_the_size_rows_and_their_names(caplog):
    coco, detections = p0005_ground_truth()
    found = [d for d, ann in zip(detections, coco.dataset["annotations"]) if ann["area"] >= 1024]  # 82 of 131
    default, _ = coco_bbox_stats(coco, {1: found}, 100, LOGGER)
    default = dict(zip(stat_names(100), default))
    assert (default["APs"], default["APm"], default["APl"]) == (0.0, pytest.approx(1.0), -1.0)

    text = "vehicles=0:1500,big=1500:inf"
    ranges = parse_area_ranges(text)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        custom, _ = coco_bbox_stats(coco, {1: found}, 100, LOGGER, ranges)
    names = stat_names(100, ranges)
    assert names == ["AP", "AP50", "AP75", "AP_vehicles", "AP_big", "AR1", "AR10", "AR100", "AR_vehicles", "AR_big"]
    custom = dict(zip(names, custom))
    in_range = [(ann["category_id"], ann["area"]) for ann in coco.dataset["annotations"] if ann["area"] < 1500]
    recall = np.mean([np.mean([area >= 1024 for c, area in in_range if c == category]) for category in (8, 9)])
    assert custom["AR_vehicles"] == pytest.approx(recall) and custom["AP_vehicles"] == pytest.approx(recall, abs=0.02)
    assert custom["AP_big"] == pytest.approx(1.0) and custom["AP"] == default["AP"]  # 'all' is unchanged
    assert "area=vehicles | maxDets=100 ]" in caplog.text
    assert tensorboard_metrics(ranges) == ["AP", "AP50", "AP75", "AP_vehicles", "AP_big"]
    assert parse_args(["--area_ranges", text]).area_ranges == text
    assert parse_area_ranges(COCO_AREA_RANGES) == [("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2),
                                                   ("large", 96 ** 2, 1e10)]  # COCOeval's own


@pytest.mark.parametrize("value, message", [
    ("small=0-1024", "expected LABEL=MIN:MAX"),
    ("small=0:big", "MIN and MAX must be numbers"),
    ("small=100:10", "need 0 <= MIN < MAX"),
    ("all=0:10", "label 'all' is reserved"),
    ("a=0:1,a=1:2", "label 'a' is given twice"),
    ("", "no ranges"),
])
def test_bad_area_ranges_are_refused_naming_the_flag(capsys, value, message):
    with pytest.raises(SystemExit):
        parse_args(["--area_ranges", value])
    err = capsys.readouterr().err
    assert "--area_ranges: " in err and message in err


# --- bad input, with and without --skip_bad_samples -------------------------------------------------

def sample_copy(tmp_path: Path, sample_root: Path, edit=None) -> Path:
    """data/sample's val split (4 real photos, 17 boxes) under a new root, its json edited."""
    root = tmp_path / "data"
    shutil.copytree(sample_root / "val", root / "val")
    coco = json.loads((sample_root / "annotations" / "instances_val.json").read_text())
    if edit is not None:
        edit(coco)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root


def sample_dataset(root: Path, *flags: str):
    return build_dataset("val", parse_args(["--data_path", str(root), "--min_size", "128", "--max_size", "192",
                                            *flags]))


def unknown_category(coco):
    coco["annotations"][2]["category_id"] = 999


def box_outside(coco):
    coco["annotations"][4]["bbox"] = [-60.0, 10.0, 50.0, 20.0]  # negative x, ends left of the image


def box_not_finite(coco):
    coco["annotations"][6]["bbox"] = [10.0, float("inf"), 5.0, 5.0]


@pytest.mark.parametrize("edit, ann_id, error", [
    (unknown_category, 3, r"annotation\(s\) with a category_id not in 'categories'.*annotation 3 \(image 2, "
                          r"category_id 999\)"),
    (box_outside, 5, r"annotation\(s\) whose bbox lies entirely outside its image: annotation 5 "),
    (box_not_finite, 7, r"annotation\(s\) whose bbox is not 4 finite numbers: annotation 7 "),
])
def test_bad_records_stop_the_run_or_are_skipped_and_logged(tmp_path, sample_root, caplog, edit, ann_id, error):
    root = sample_copy(tmp_path, sample_root, edit)
    with pytest.raises(ValueError, match=error) as refused:
        sample_dataset(root)
    assert "--skip_bad_samples" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="detr_ssl"):
        dataset = sample_dataset(root, "--skip_bad_samples")
    assert len(dataset) == 4 and ann_id not in dataset.coco.anns and len(dataset.coco.anns) == 16
    assert sum(len(target["labels"]) for _, target in dataset) == 16
    assert len(dataset.skipped) == 1 and dataset.skipped[0].startswith(f"annotation {ann_id} (image ")
    assert "instances_val.json: --skip_bad_samples skipped 0 image(s) (with their annotations) and 1 annotation(s)" \
        in caplog.text
    assert f"annotation {ann_id} (image" in caplog.text and "000000000" in caplog.text  # record and image file


def test_a_missing_image_fails_when_loaded_or_is_skipped_when_scanned(tmp_path, sample_root, caplog):
    root = sample_copy(tmp_path, sample_root)
    (root / "val" / "000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"image 2: file not found: {root / 'val' / '000000000042.jpg'}"):
        sample_dataset(root)[1]
    with caplog.at_level(logging.WARNING, logger="detr_ssl"):
        dataset = sample_dataset(root, "--skip_bad_samples")
    assert dataset.ids == [1, 3, 4] and 2 not in dataset.coco.imgs and not dataset.coco.getAnnIds(imgIds=[2])
    assert "skipped 1 image(s) (with their annotations) and 0 annotation(s)" in caplog.text
    assert f"image 2: file not found: {root / 'val' / '000000000042.jpg'}" in caplog.text
    assert [int(target["image_id"]) for _, target in dataset] == [1, 3, 4]


@pytest.mark.parametrize("damage, error", [
    ("truncate", r"cannot read image .*000000000042\.jpg \(image id 2\)"),
    ("garbage", r"cannot read image .*000000000042\.jpg \(image id 2\)"),
    ("resize", r"000000000042\.jpg \(image id 2\) is 320x213 px but .* says 640x478"),
])
def test_an_unreadable_image_stops_the_run_or_is_replaced_by_the_next(tmp_path, sample_root, damage, error):
    root = sample_copy(tmp_path, sample_root)
    path = root / "val" / "000000000042.jpg"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_bytes(b"not a JPEG at all" * 100)
    else:
        with Image.open(path) as photo:
            photo.resize((320, 213)).save(path)
    with pytest.raises((OSError, ValueError), match=error):
        sample_dataset(root)[1]
    dataset = sample_dataset(root, "--skip_bad_samples")
    image, target = dataset[1]
    assert int(target["image_id"]) == 3  # the next image stands in
    assert len(target["skipped"]) == 1 and re.search(error, target["skipped"][0])
    assert "skipped" not in dataset[2][1] and skipped_in([dataset[0][1], target]) == target["skipped"]


def test_an_empty_annotation_file_is_an_error_with_or_without_the_flag(tmp_path, sample_root):
    root = sample_copy(tmp_path, sample_root)
    (root / "annotations" / "instances_val.json").write_text("")
    for flags in ([], ["--skip_bad_samples"]):
        with pytest.raises(ValueError, match=r"instances_val\.json: empty file \(0 bytes\).*not a whole file"):
            sample_dataset(root, *flags)
    (root / "annotations" / "instances_val.json").write_text(json.dumps({"images": [], "annotations": [],
                                                                         "categories": []}))
    for flags in ([], ["--skip_bad_samples"]):
        with pytest.raises(ValueError, match=r"instances_val\.json: no images listed"):
            sample_dataset(root, *flags)


def test_nothing_left_after_skipping_is_an_error(tmp_path, sample_root):
    root = sample_copy(tmp_path, sample_root)
    for path in (root / "val").glob("*.jpg"):
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(BadSampleError, match="all 4 images are bad"):
        sample_dataset(root, "--skip_bad_samples")[0]
    for path in (root / "val").glob("*.jpg"):
        path.unlink()
    with pytest.raises(ValueError, match="every image was skipped as bad"):
        sample_dataset(root, "--skip_bad_samples")


def test_skip_bad_samples_in_an_unlabelled_folder(tmp_path, sample_root):
    folder = tmp_path / "unlabelled"
    shutil.copytree(sample_root / "unlabelled", folder)
    victim = sorted(folder.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    flags = ["--dataset_file", "folder", "--ssl_task", "mim_continuous", "--ssl_mode", "pretrain"]
    with pytest.raises(OSError, match=f"cannot read image {victim}"):
        build_dataset("train", parse_args(["--data_path", str(folder), *flags]))[0]
    dataset = build_dataset("train", parse_args(["--data_path", str(folder), *flags, "--skip_bad_samples"]))
    _, target = dataset[0]
    assert int(target["image_id"]) == 1 and str(victim) in target["skipped"][0]


def test_a_training_run_logs_the_images_it_skipped_at_the_end_of_the_epoch(tmp_path, sample_root, capsys):
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    victim = root / "train" / "000000000025.jpg"
    victim.write_bytes(victim.read_bytes()[:2000])
    flags = ["--data_path", str(root), "--val_split", "train", "--device", "cpu", "--num_workers", "0", "--backbone",
             "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
             "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "5", "--min_size", "96", "--max_size",
             "128", "--batch_size", "2", "--epochs", "1", "--no-tensorboard", "--no-augment",
             "--output_dir", str(tmp_path / "run")]
    assert "000000000025.jpg" in cli_error(capsys, flags)  # one line, no traceback
    train_main([*flags, "--skip_bad_samples"])
    log = (tmp_path / "run" / "log.txt").read_text()
    for stage in ("train", "val"):
        assert f"epoch 0 {stage}: --skip_bad_samples skipped 1 bad image(s)" in log
    assert f"cannot read image {victim} (image id 2)" in log
