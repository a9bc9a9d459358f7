"""scripts/voc_to_coco.py: VOC boxes (1-based, inclusive) and rotated boxes come back as the right COCO
boxes on real photos; image sets, classes and every problem are handled by name."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parent.parent
voc_to_coco = load_script("voc_to_coco")


def voc_xml(file_name: str, size: tuple[int, int] | None, objects: list[str]) -> str:
    size_xml = "" if size is None else \
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return (f"<annotation><folder>VOC</folder><filename>{file_name}</filename>{size_xml}"
            f"{''.join(objects)}</annotation>\n")


def bndbox(name: str, x: float, y: float, w: float, h: float, difficult: int = 0) -> str:
    """A VOC object for COCO box ``x y w h``: 1-based inclusive pixel indices, as VOC writes them."""
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
            f"<xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>")


def robndbox(name: str, cx: float, cy: float, w: float, h: float, angle: float) -> str:
    return (f"<object><type>robndbox</type><name>{name}</name><difficult>0</difficult><robndbox><cx>{cx}</cx>"
            f"<cy>{cy}</cy><w>{w}</w><h>{h}</h><angle>{angle}</angle></robndbox></object>")


@pytest.fixture()
def voc_split(tmp_path, sample_root) -> tuple[Path, Path, dict]:
    """data/sample's train photos with VOC xml files made from its COCO json, in a DIOR-R-like
    layout whose folder names hold spaces."""
    source = json.loads((sample_root / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in source["categories"]}
    images, annotations = tmp_path / "JPEG Images", tmp_path / "Annotations" / "Oriented Bounding Boxes"
    shutil.copytree(sample_root / "train", images)
    annotations.mkdir(parents=True)
    for image in source["images"]:
        objects = [bndbox(names[a["category_id"]], *a["bbox"]) for a in source["annotations"]
                   if a["image_id"] == image["id"]]
        xml = voc_xml(image["file_name"], (image["width"], image["height"]), objects)
        (annotations / Path(image["file_name"]).with_suffix(".xml")).write_text(xml)
    return images, annotations, source


def test_boxes_come_back_exactly_on_the_sample_photos(voc_split, tmp_path, capsys):
    images, annotations, source = voc_split
    out = tmp_path / "out" / "instances_train.json"
    assert voc_to_coco.main(["--images", str(images), "--annotations", str(annotations), "--out", str(out),
                             "--check"]) == 0
    printed = capsys.readouterr().out
    coco = json.loads(out.read_text())
    names = sorted({c["name"] for c in source["categories"]
                    if any(a["category_id"] == c["id"] for a in source["annotations"])})
    assert [(c["id"], c["name"]) for c in coco["categories"]] == list(enumerate(names, start=1))
    assert f"classes (ids 1..7, collected from the annotations, sorted by name): {', '.join(names)}" in printed
    assert coco["info"]["classes"] == "collected from the annotations, sorted by name"
    assert coco["images"] == source["images"]
    ours = {c["id"]: c["name"] for c in coco["categories"]}
    theirs = {c["id"]: c["name"] for c in source["categories"]}
    assert len(coco["annotations"]) == len(source["annotations"]) == 13
    for ann, src in zip(coco["annotations"], source["annotations"]):
        assert ann["bbox"] == pytest.approx(src["bbox"], abs=1e-4)
        assert ours[ann["category_id"]] == theirs[src["category_id"]]
        assert (ann["iscrowd"], ann["difficult"], ann["image_id"]) == (0, 0, src["image_id"])
        assert "segmentation" not in ann


def test_the_one_based_rule(tmp_path, sample_root):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sample_root / "train" / "000000000009.jpg", images)  # 640x480
    objects = ["<object><name>whole</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>640</xmax><ymax>480</ymax>"
               "</bndbox></object>",
               "<object><name>pixel</name><difficult>1</difficult><bndbox><xmin>10</xmin><ymin>20</ymin>"
               "<xmax>10</xmax><ymax>20</ymax></bndbox></object>"]
    (tmp_path / "000000000009.xml").write_text(voc_xml("000000000009.jpg", (640, 480), objects))
    coco, problems, counts = voc_to_coco.convert(images, tmp_path, ["whole", "pixel"])
    assert problems == [] and counts["difficult"] == 1
    assert [(a["bbox"], a["difficult"]) for a in coco["annotations"]] == [([0, 0, 640, 480], 0), ([9, 19, 1, 1], 1)]


def test_rotated_boxes_both_flavours(tmp_path, sample_root, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sample_root / "train" / "000000000009.jpg", images)  # 640x480
    dior = ("<object><name>ship</name><difficult>0</difficult><robndbox><x_left_top>100</x_left_top>"
            "<y_left_top>50</y_left_top><x_right_top>140</x_right_top><y_right_top>80</y_right_top>"
            "<x_right_bottom>110</x_right_bottom><y_right_bottom>120</y_right_bottom><x_left_bottom>70"
            "</x_left_bottom><y_left_bottom>90</y_left_bottom></robndbox></object>")
    objects = [robndbox("ship", 300, 200, 100, 40, math.pi / 6), robndbox("ship", 320, 240, 100, 40, math.pi / 2),
               robndbox("ship", 630, 240, 100, 40, 0.0), dior]
    annotations = tmp_path / "Annotations"
    annotations.mkdir()
    (annotations / "000000000009.xml").write_text(voc_xml("000000000009.jpg", (640, 480), objects))
    out = tmp_path / "out.json"
    assert voc_to_coco.main(["--images", str(images), "--annotations", str(annotations), "--out", str(out),
                             "--classes", "ship"]) == 0
    assert "4 boxes (4 rotated, 0 difficult; 1 clipped to the image)" in capsys.readouterr().out
    turned, upright, clipped, corners = json.loads(out.read_text())["annotations"]
    half_w = 50 * math.cos(math.pi / 6) + 20 * math.sin(math.pi / 6)
    half_h = 50 * math.sin(math.pi / 6) + 20 * math.cos(math.pi / 6)
    assert turned["bbox"] == pytest.approx([300 - half_w, 200 - half_h, 2 * half_w, 2 * half_h], abs=1e-3)
    assert len(turned["segmentation"][0]) == 8 and turned["area"] == pytest.approx(4 * half_w * half_h, abs=1e-2)
    assert upright["bbox"] == pytest.approx([300, 190, 40, 100], abs=1e-3)  # turned by 90 degrees: w and h swap
    assert clipped["bbox"] == pytest.approx([580, 220, 60, 40]) and clipped["segmentation"][0][2] == 680  # kept whole
    assert corners["bbox"] == [70, 50, 70, 70]
    assert corners["segmentation"] == [[100, 50, 140, 80, 110, 120, 70, 90]]


def test_image_set_selects_the_listed_images_in_its_order(voc_split, tmp_path):
    images, annotations, _ = voc_split
    image_set = tmp_path / "ImageSets" / "Main" / "train.txt"
    image_set.parent.mkdir(parents=True)
    image_set.write_text("000000000030\n\n000000000009 1\n")
    coco, problems, counts = voc_to_coco.convert(images, annotations, image_set=image_set)
    assert [i["file_name"] for i in coco["images"]] == ["000000000030.jpg", "000000000009.jpg"]
    assert problems == [] and counts["images"] == 2  # the xml files of the other images are not orphans
    image_set.write_text("000000000030\n000000000099\n")
    _, problems, _ = voc_to_coco.convert(images, annotations, image_set=image_set)
    assert [str(p) for p in problems] == [f"error: {image_set}:2: image id '000000000099' has no image file under "
                                          f"--images {images}"]


def test_problems_are_named_and_nothing_is_written(voc_split, tmp_path, capsys):
    images, annotations, _ = voc_split
    (annotations / "000000000009.xml").write_text(voc_xml("other.jpg", (100, 100), [bndbox("bowl", 1, 1, 5, 5)]))
    (annotations / "000000000025.xml").write_text("<annotation><object><name>giraffe</name>\n<bndbox>")
    (annotations / "000000000030.xml").write_text(voc_xml("000000000030.jpg", None, [
        bndbox("cat", 1, 1, 5, 5), "<object><name>vase</name></object>",
        "<object><name>vase</name><difficult>2</difficult><bndbox/></object>",
        "<object><name>vase</name><bndbox><xmin>a</xmin></bndbox></object>", bndbox("vase", 900, 900, 5, 5)]))
    (annotations / "stray.xml").write_text(voc_xml("stray.jpg", (10, 10), []))
    out = tmp_path / "out.json"
    argv = ["--images", str(images), "--annotations", str(annotations), "--out", str(out), "--check",
            "--classes", "bowl,vase,zebra,giraffe,orange"]
    assert voc_to_coco.main(argv) == 1 and not out.exists()
    err = capsys.readouterr().err
    xml9, xml25, xml30 = (annotations / f"0000000000{n}.xml" for n in ("09", "25", "30"))
    assert f"error: {xml9}: <size> 100x100 differs from the image file's 640x480" in err
    assert f"warning: {xml9}: <filename> 'other.jpg' is not the image's name '000000000009.jpg'" in err
    assert f"error: {xml25}:2: not valid xml" in err
    assert f"warning: {xml30}: no usable <size>; the image file's" in err
    assert f"error: {xml30}: object 1 (cat): unknown class 'cat'" in err and "see --classes" in err
    assert f"error: {xml30}: object 2: (vase) has neither <bndbox> nor <robndbox>" in err
    assert f"error: {xml30}: object 3: (vase) <difficult> is '2', not 0 or 1" in err
    assert f"error: {xml30}: object 4: (vase) <bndbox> needs the numbers xmin ymin xmax ymax" in err
    assert f"error: {xml30}: object 5 (vase): box" in err and "has no area inside the" in err
    assert f"warning: {annotations / 'stray.xml'}: label file without an image" in err
    (annotations / "000000000009.xml").write_text("<HRSC_Image><HRSC_Objects/></HRSC_Image>")
    assert voc_to_coco.main(argv) == 1
    assert "not a Pascal-VOC file: root element <HRSC_Image>, expected <annotation>" in capsys.readouterr().err


def test_a_wrong_annotations_folder_fails_with_the_likely_fix(voc_split, tmp_path, capsys):
    images, annotations, _ = voc_split
    out = tmp_path / "out.json"
    yolo = REPO_ROOT / "tests" / "fixtures" / "coco8" / "labels" / "train"
    assert voc_to_coco.main(["--images", str(images), "--annotations", str(yolo), "--out", str(out)]) == 1
    assert f"error: {yolo}: no objects found: found 4 .txt files in --annotations: these look like YOLO or DOTA " \
           "labelTxt files; use scripts/yolo_to_coco.py or scripts/dota_to_coco.py" in capsys.readouterr().err
    for path in sorted(annotations.glob("*.xml"))[:3]:
        path.unlink()
    argv = ["--images", str(images), "--annotations", str(annotations), "--out", str(out)]
    assert voc_to_coco.main(argv) == 1 and not out.exists()
    assert "3 of 4 images have no .xml file in --annotations" in capsys.readouterr().err
    assert voc_to_coco.main([*argv, "--allow_unlabelled"]) == 0 and out.exists()


def test_command_line_with_spaces_and_a_classes_file(voc_split, tmp_path):
    images, annotations, _ = voc_split
    classes = tmp_path / "my classes.txt"
    classes.write_text("zebra\ngiraffe\nbowl\norange\nbroccoli\npotted plant\nvase\nextra\n")
    out = tmp_path / "out dir" / "instances_train.json"
    command = [sys.executable, "scripts/voc_to_coco.py", "--images", str(images), "--annotations", str(annotations),
               "--classes_file", str(classes), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    assert "(ids 1..8, as given): zebra, giraffe" in done.stdout
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]][:2] == ["zebra", "giraffe"] and len(coco["annotations"]) == 13
    assert "1-based" in subprocess.run([sys.executable, "scripts/voc_to_coco.py", "--help"], cwd=REPO_ROOT,
                                       check=True, capture_output=True, text=True).stdout
