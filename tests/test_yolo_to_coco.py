"""scripts/yolo_to_coco.py: YOLO boxes come back exactly, class indices map to the right ids."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "yolo_to_coco.py"

yolo_to_coco = load_script("yolo_to_coco")


def read_labels(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]


def copy_split(coco8_dir: Path, root: Path, split: str = "train") -> tuple[Path, Path]:
    shutil.copytree(coco8_dir / "images" / split, root / "images")
    shutil.copytree(coco8_dir / "labels" / split, root / "labels")
    return root / "images", root / "labels"


@pytest.mark.parametrize(("split", "objects"), [("train", 13), ("val", 17)])
def test_round_trip_on_coco8(coco8_dir, split, objects):
    names = yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml"))
    coco, problems, _ = yolo_to_coco.convert(coco8_dir / "images" / split, coco8_dir / "labels" / split, names, "coco")
    assert problems == []
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == objects
    assert [ann["id"] for ann in coco["annotations"]] == list(range(1, objects + 1))
    for info in coco["images"]:
        with Image.open(coco8_dir / "images" / split / info["file_name"]) as image:
            assert (info["width"], info["height"]) == image.size
        anns = [ann for ann in coco["annotations"] if ann["image_id"] == info["id"]]
        rows = read_labels(coco8_dir / "labels" / split / Path(info["file_name"]).with_suffix(".txt"))
        assert len(anns) == len(rows)
        for ann, (cls, cx, cy, w, h) in zip(anns, rows):
            x, y, bw, bh = ann["bbox"]
            width, height = info["width"], info["height"]
            back = [(x + bw / 2) / width, (y + bh / 2) / height, bw / width, bh / height]
            assert back == pytest.approx([cx, cy, w, h], abs=1e-6)
            assert ann["category_id"] == yolo_to_coco.COCO_CATEGORY_IDS[names[int(cls)]]
            assert ann["area"] == pytest.approx(bw * bh, abs=1e-3) and ann["iscrowd"] == 0


def test_category_ids_coco_and_sequential(coco8_dir):
    names = yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml"))
    coco_ids = {c["name"]: c["id"] for c in yolo_to_coco.category_table(names, "coco")}
    assert (coco_ids["person"], coco_ids["stop sign"], coco_ids["toothbrush"]) == (1, 13, 90)
    assert len(coco_ids) == 80 and len(set(coco_ids.values())) == 80
    sequential = {c["name"]: c["id"] for c in yolo_to_coco.category_table(names, "sequential")}
    assert (sequential["person"], sequential["toothbrush"]) == (1, 80)
    with pytest.raises(ValueError, match="not COCO class names: \\['sofa'\\]"):
        yolo_to_coco.category_table(["person", "sofa"], "coco")


def test_coco_id_table_matches_torchvision():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    categories = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = COCO category id
    official = {name: index for index, name in enumerate(categories) if name not in ("__background__", "N/A")}
    assert yolo_to_coco.COCO_CATEGORY_IDS == official


def test_names_from_yaml_text_file_or_comma_list(tmp_path, coco8_dir):
    assert yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml"))[:2] == ["person", "bicycle"]
    (tmp_path / "list.yaml").write_text("names: [ship, harbor]\n")
    (tmp_path / "names.txt").write_text("ship\n\nharbor\n")
    assert yolo_to_coco.load_names(str(tmp_path / "list.yaml")) == ["ship", "harbor"]
    assert yolo_to_coco.load_names(str(tmp_path / "names.txt")) == ["ship", "harbor"]
    assert yolo_to_coco.load_names("ship, harbor") == ["ship", "harbor"]
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        yolo_to_coco.load_names(str(tmp_path / "missing.yaml"))


def test_images_without_label_file_are_kept_empty(tmp_path, coco8_dir):
    images, labels = copy_split(coco8_dir, tmp_path)
    removed = len(read_labels(labels / "000000000009.txt"))
    (labels / "000000000009.txt").unlink()
    coco, problems, _ = yolo_to_coco.convert(images, labels, yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml")))
    assert problems == []
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 13 - removed
    assert all(ann["image_id"] != 1 for ann in coco["annotations"])  # image 1 is 000000000009.jpg


def test_check_names_each_bad_line_and_writes_nothing(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    bad = labels / "000000000025.txt"
    bad.write_text(bad.read_text() + "23 0.5 0.5\n99 0.5 0.5 0.1 0.1\n0 1.2 0.5 0.1 0.1\n0 0.5 0.5 0 0.1\n")
    (labels / "000000000030.txt").write_text("")
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"), "--out", str(out)]
    assert yolo_to_coco.main([*argv, "--check"]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad}:3: malformed line '23 0.5 0.5'" in err
    assert f"error: {bad}:4: unknown class index 99" in err
    assert f"error: {bad}:5: box (cx 1.2, cy 0.5, w 0.1, h 0.1) lies entirely outside the image" in err
    assert f"error: {bad}:6: box" in err and "has no area" in err
    assert f"warning: {labels / '000000000030.txt'}: empty label file" in err
    assert "4 error(s)" in err and not out.exists()


def test_partly_outside_boxes_are_clipped_and_reported(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    (labels / "000000000034.txt").write_text("22 0.9 0.5 0.4 0.2\n")  # spans x 0.7..1.1
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"), "--out", str(out)]
    assert yolo_to_coco.main([*argv, "--check"]) == 0
    assert f"warning: {labels / '000000000034.txt'}:1: box" in capsys.readouterr().err
    coco = json.loads(out.read_text())
    width = coco["images"][3]["width"]
    x, _, w, _ = coco["annotations"][-1]["bbox"]
    assert x == pytest.approx(0.7 * width) and x + w == pytest.approx(width)


@pytest.mark.parametrize("split", ["train", "val"])
def test_readme_command_reproduces_the_sample_json(tmp_path, coco8_dir, split):
    out = tmp_path / f"instances_{split}.json"
    command = [sys.executable, "scripts/yolo_to_coco.py", "--images", str(coco8_dir / "images" / split),
               "--labels", str(coco8_dir / "labels" / split), "--names", str(coco8_dir / "coco8.yaml"),
               "--category_ids", "coco", "--out", str(out)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    shipped = REPO_ROOT / "data" / "sample" / "annotations" / f"instances_{split}.json"
    assert json.loads(out.read_text()) == json.loads(shipped.read_text())


# --- YOLO-OBB, extra columns, the wrong folder -----------------------------------------------------

ISAID_TRAIN = Path(__file__).resolve().parent / "fixtures" / "isaid_sample" / "train"


def rotate(x: float, y: float, w: float, h: float, angle: float) -> list[float]:
    """The corners of box ``x y w h`` turned by ``angle`` radians about its centre."""
    cx, cy, cos, sin = x + w / 2, y + h / 2, math.cos(angle), math.sin(angle)
    corners = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        corners += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return corners


def isaid_obb(root: Path, angle: float) -> tuple[Path, Path, dict, list[list[float]]]:
    """P0005 (884x977, 131 real objects) with YOLO-OBB labels: each iSAID box turned by ``angle``;
    returns the folders, the source json and the corners in pixels."""
    source = json.loads((ISAID_TRAIN / "instancesonly_filtered_train.json").read_text())
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    shutil.copy(ISAID_TRAIN / "images" / "P0005.png", images)
    width, height = source["images"][0]["width"], source["images"][0]["height"]
    polygons, lines = [], []
    for ann in source["annotations"]:
        corners = rotate(*ann["bbox"], angle)
        polygons.append(corners)
        normalised = [v / (width if i % 2 == 0 else height) for i, v in enumerate(corners)]
        lines.append(" ".join([str(ann["category_id"] - 1), *(f"{v:.6f}" for v in normalised)]))
    (labels / "P0005.txt").write_text("\n".join(lines) + "\n")
    return images, labels, source, polygons


def isaid_names(source: dict) -> list[str]:
    return [c["name"] for c in sorted(source["categories"], key=lambda c: c["id"])]


@pytest.mark.parametrize("fmt", ["auto", "obb"])
def test_obb_corners_of_real_boxes_give_the_boxes_back(tmp_path, fmt):
    images, labels, source, polygons = isaid_obb(tmp_path, angle=0.0)
    coco, problems, counts = yolo_to_coco.convert(images, labels, isaid_names(source),
                                                  columns=yolo_to_coco.Columns(format=fmt))
    assert problems == [] and counts["obb"] == 131 and counts["detect"] == 0 and counts["clipped"] == 0
    assert [a["category_id"] for a in coco["annotations"]] == [a["category_id"] for a in source["annotations"]]
    for ann, src, polygon in zip(coco["annotations"], source["annotations"], polygons):
        assert ann["bbox"] == pytest.approx(src["bbox"], abs=1e-3)
        assert ann["segmentation"] == [pytest.approx(polygon, abs=1e-3)]
        assert ann["area"] == pytest.approx(src["bbox"][2] * src["bbox"][3], rel=1e-4) and ann["iscrowd"] == 0


def test_turned_obb_boxes_are_the_polygons_extent_clipped_and_counted(tmp_path, capsys):
    angle = math.radians(30)
    images, labels, source, polygons = isaid_obb(tmp_path, angle)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(isaid_names(source)) + "\n")
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(names), "--out", str(out)]
    assert yolo_to_coco.main(argv) == 0
    width, height = 884, 977
    expected_clipped = 0
    for ann, polygon in zip(json.loads(out.read_text())["annotations"], polygons):
        xs, ys = polygon[0::2], polygon[1::2]
        clipped = min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height
        expected_clipped += clipped
        x1, y1, x2, y2 = max(min(xs), 0), max(min(ys), 0), min(max(xs), width), min(max(ys), height)
        assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2e-3)
        assert ann["segmentation"] == [pytest.approx(polygon, abs=2e-3)]  # as labelled, not clipped
    assert expected_clipped > 0  # real boxes at the image border stick out once turned
    assert f"131 boxes (0 detect, 131 obb; {expected_clipped} clipped to the image)" in capsys.readouterr().out


def test_malformed_lines_name_the_accepted_formats_and_the_flags(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    bad = labels / "000000000025.txt"
    bad.write_text(bad.read_text() + "23 0.5 0.5 0.1 0.1 0.3 0.3\n"
                   "10 20 50 20 50 60 10 60 plane 0\n")
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"),
            "--out", str(tmp_path / "out.json")]
    assert yolo_to_coco.main(argv) == 1
    err = capsys.readouterr().err
    for number in (3, 4):
        line = next(line for line in err.splitlines() if f"{bad}:{number}:" in line)
        assert "'class cx cy w h' (--format detect)" in line
        assert "'class x1 y1 x2 y2 x3 y3 x4 y4' (--format obb" in line and "--extra_columns" in line
    assert yolo_to_coco.main([*argv, "--format", "obb"]) == 1  # the 5-column lines are then malformed
    assert f"{labels / '000000000009.txt'}:1: malformed line" in capsys.readouterr().err


def with_attributes(labels: Path, values: str) -> dict[str, list[str]]:
    """Append ``values`` (attribute columns) to every label line; returns the original lines."""
    original = {}
    for path in labels.glob("*.txt"):
        original[path.name] = path.read_text().splitlines()
        path.write_text("".join(f"{line} {values}\n" for line in original[path.name]))
    return original


def test_extra_columns_error_ignore_keep(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    reference, _, _ = yolo_to_coco.convert(images, labels, yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml")))
    with_attributes(labels, "71.5 1.8 34")
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"),
            "--out", str(out)]
    assert yolo_to_coco.main(argv) == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "3 column(s) after the box 'class cx cy w h': attribute columns need --extra_columns ignore or keep" in err
    assert yolo_to_coco.main([*argv, "--extra_columns", "ignore"]) == 0
    assert json.loads(out.read_text()) == reference
    assert yolo_to_coco.main([*argv, "--extra_columns", "keep", "--extra_column_names", "weight,height,age"]) == 0
    kept = json.loads(out.read_text())["annotations"]
    assert all(a["attributes"] == {"weight": 71.5, "height": 1.8, "age": 34.0} for a in kept)
    assert [{k: v for k, v in a.items() if k != "attributes"} for a in kept] == reference["annotations"]
    assert yolo_to_coco.main([*argv, "--extra_columns", "keep"]) == 0
    first = json.loads(out.read_text())["annotations"][0]
    assert first["attributes"] == {"extra_0": 71.5, "extra_1": 1.8, "extra_2": 34.0}
    capsys.readouterr()
    assert yolo_to_coco.main([*argv, "--extra_columns", "keep", "--extra_column_names", "weight,height"]) == 1
    assert "3 extra column(s), but --extra_column_names names 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        yolo_to_coco.main([*argv, "--extra_column_names", "weight,height,age"])
    assert "--extra_column_names needs --extra_columns keep" in capsys.readouterr().err


def test_nine_columns_are_obb_under_auto_and_detect_with_four_attributes_when_told(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    reference, _, _ = yolo_to_coco.convert(images, labels, yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml")))
    with_attributes(labels, "71.5 1.8 34 2")  # 9 columns
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"),
            "--out", str(out), "--extra_columns", "keep"]
    assert yolo_to_coco.main(argv) == 0  # read as corners, as the rule says, and told so
    assert "note: 13 lines of 9 columns were read as oriented boxes (--format auto); if they are boxes with 4 " \
           "attribute columns, pass --format detect" in capsys.readouterr().err
    assert all(a["bbox"] != b["bbox"] for a, b in zip(json.loads(out.read_text())["annotations"],
                                                       reference["annotations"]))
    assert yolo_to_coco.main([*argv, "--format", "detect"]) == 0
    kept = json.loads(out.read_text())["annotations"]
    assert [a["bbox"] for a in kept] == [a["bbox"] for a in reference["annotations"]]
    assert kept[0]["attributes"] == {"extra_0": 71.5, "extra_1": 1.8, "extra_2": 34.0, "extra_3": 2.0}
    with_attributes(labels, "5")  # 10 columns: ambiguous under auto
    assert yolo_to_coco.main(argv) == 1
    assert "10 columns are ambiguous" in capsys.readouterr().err
    assert yolo_to_coco.main([*argv, "--format", "detect"]) == 0


def test_a_file_mixing_boxes_and_obb_is_refused(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    mixed = labels / "000000000034.txt"
    mixed.write_text(mixed.read_text() + "22 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n")
    argv = ["--images", str(images), "--labels", str(labels), "--names", str(coco8_dir / "coco8.yaml"),
            "--out", str(tmp_path / "out.json")]
    assert yolo_to_coco.main(argv) == 1
    message = f"error: {mixed}: mixes 'class cx cy w h' and 'class x1 y1 x2 y2 x3 y3 x4 y4' lines"
    assert message in capsys.readouterr().err


def test_a_wrong_labels_folder_fails_with_the_likely_fix(tmp_path, coco8_dir, capsys):
    images, labels = copy_split(coco8_dir, tmp_path)
    out = tmp_path / "out.json"
    names = str(coco8_dir / "coco8.yaml")
    xml = tmp_path / "Annotations"
    xml.mkdir()
    for path in images.glob("*.jpg"):
        (xml / f"{path.stem}.xml").write_text("<annotation><object><name>bowl</name></object></annotation>")
    assert yolo_to_coco.main(["--images", str(images), "--labels", str(xml), "--names", names, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {xml}: no objects found: found 4 .xml files in --labels: these look like Pascal-VOC " \
           "annotations; use scripts/voc_to_coco.py" in err and not out.exists()
    parent = coco8_dir / "labels"  # labels/ instead of labels/train
    assert yolo_to_coco.main(["--images", str(images), "--labels", str(parent), "--names", names,
                              "--out", str(out)]) == 1
    assert "they do not mirror --images: image '000000000009.jpg' needs" in capsys.readouterr().err
    for path in sorted(labels.glob("*.txt"))[:3]:
        path.unlink()
    argv = ["--images", str(images), "--labels", str(labels), "--names", names, "--out", str(out)]
    assert yolo_to_coco.main(argv) == 1 and not out.exists()
    assert "3 of 4 images have no .txt file in --labels" in capsys.readouterr().err
    assert yolo_to_coco.main([*argv, "--allow_unlabelled"]) == 0 and out.exists()
    for path in labels.glob("*.txt"):
        path.write_text("")
    assert yolo_to_coco.main([*argv, "--allow_unlabelled"]) == 1
    assert "no objects in the 1 .txt files found" in capsys.readouterr().err
