"""scripts/yolo_to_coco.py: YOLO boxes come back exactly, class indices map to the right ids."""
from __future__ import annotations

import json
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
    coco, problems = yolo_to_coco.convert(coco8_dir / "images" / split, coco8_dir / "labels" / split, names, "coco")
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
    coco, problems = yolo_to_coco.convert(images, labels, yolo_to_coco.load_names(str(coco8_dir / "coco8.yaml")))
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
