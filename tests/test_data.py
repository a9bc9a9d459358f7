"""COCO-json datasets: layouts, the target format, and bad input named rather than skipped."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.ops import box_convert

from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, collate_fn, get_coco_api, num_classes_of
from detr_ssl.data.coco import CocoDetection
from detr_ssl.data.convert import relative_image_files
from detr_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_ssl.utils.box_ops import cxcywh_to_xyxy
from detr_ssl.utils.image import find_images, image_files

# coco8 objects by COCO category id: train bowl x3, orange x4, giraffe x2, broccoli, zebra,
# potted plant, vase; val person x10, horse x2, elephant x2, dog, umbrella, potted plant.
COCO8_LABELS = {
    "train": Counter({51: 3, 55: 4, 25: 2, 56: 1, 24: 1, 64: 1, 86: 1}),
    "val": Counter({1: 10, 19: 2, 22: 2, 18: 1, 28: 1, 64: 1}),
}


def make_args(root: Path, *flags: str):
    return parse_args(["--data_path", str(root), "--min_size", "256", "--max_size", "400", *flags])


def sample_json(sample_root: Path, split: str = "val") -> dict:
    return json.loads((sample_root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture
def make_root(tmp_path, sample_root) -> Callable[..., Path]:
    """A copy of one sample split under a new root, its json edited by ``edit(coco)``."""

    def make(edit: Callable[[dict], None] = lambda coco: None, split: str = "val", source: str = "val") -> Path:
        shutil.copytree(sample_root / source, tmp_path / split)
        coco = sample_json(sample_root, source)
        edit(coco)
        (tmp_path / "annotations").mkdir()
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        return tmp_path

    return make


def add_image(coco: dict, root: Path, split: str, image: Image.Image, name: str) -> int:
    """Save ``image`` into the split folder and list it in the json without annotations."""
    image.save(root / split / name)
    image_id = max(info["id"] for info in coco["images"]) + 1
    coco["images"].append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
    return image_id


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


@pytest.mark.parametrize("split", ["train", "val"])
def test_sample_splits_hold_the_coco8_objects(sample_root, split):
    dataset = build_dataset(split, make_args(sample_root, "--no-augment"))
    labels = Counter(label for _, target in dataset for label in target["labels"].tolist())
    assert len(dataset) == 4
    assert sum(labels.values()) == {"train": 13, "val": 17}[split]
    assert labels == COCO8_LABELS[split]
    assert num_classes_of(dataset) == 91


def test_item_format_follows_the_official_detr_targets(sample_root):
    dataset = build_dataset("val", make_args(sample_root))
    coco = sample_json(sample_root)
    for (image, target), info in zip(dataset, coco["images"]):
        anns = [ann for ann in coco["annotations"] if ann["image_id"] == info["id"]]
        height, width = image.shape[-2:]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        pixels = unnormalise(image)
        assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5 and pixels.max() - pixels.min() > 0.8
        assert target["image_id"].dtype == torch.int64 and target["image_id"].item() == info["id"]
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        assert target["size"].tolist() == [height, width] and min(height, width) == 256
        assert target["labels"].tolist() == [ann["category_id"] for ann in anns]
        assert target["iscrowd"].tolist() == [0] * len(anns)
        assert {key: target[key].dtype for key in ("boxes", "area", "labels", "iscrowd", "size", "orig_size")} == {
            "boxes": torch.float32, "area": torch.float32, "labels": torch.int64, "iscrowd": torch.int64,
            "size": torch.int64, "orig_size": torch.int64}
        scale = torch.tensor([width / info["width"], height / info["height"]] * 2)
        expected = box_convert(torch.tensor([ann["bbox"] for ann in anns]), "xywh", "xyxy") * scale
        boxes = cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
        torch.testing.assert_close(boxes, expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(target["area"], (expected[:, 2:] - expected[:, :2]).prod(1), rtol=1e-4, atol=1e-2)


def test_coco_api_and_num_classes_through_subset(sample_root):
    dataset = build_dataset("val", make_args(sample_root))
    subset = Subset(Subset(dataset, [0, 1, 2]), [0, 1])
    assert get_coco_api(subset) is dataset.coco
    assert num_classes_of(subset) == 91
    with pytest.raises(TypeError, match="COCO-json"):
        get_coco_api(torch.utils.data.TensorDataset(torch.zeros(2)))


def test_dataset_pickles_for_worker_processes(sample_root):
    dataset = build_dataset("train", make_args(sample_root))
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 4 and clone[0][1]["boxes"].shape[1] == 4


def test_official_coco2017_layout_comes_first(tmp_path, sample_root):
    coco = sample_json(sample_root)
    shutil.copytree(sample_root / "val", tmp_path / "val2017")
    shutil.copytree(sample_root / "val", tmp_path / "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    coco["images"] = coco["images"][:2]
    coco["annotations"] = [ann for ann in coco["annotations"] if ann["image_id"] <= 2]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    dataset = build_dataset("val", make_args(tmp_path))
    assert Path(dataset.root) == tmp_path / "val2017" and len(dataset) == 2
    dataset = build_dataset("train", make_args(tmp_path, "--train_split", "val"))  # split names are flags
    assert len(dataset) == 2


def test_missing_annotations_name_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("val", make_args(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "annotations" / "instances_val2017.json") in message
    assert str(tmp_path / "annotations" / "instances_val.json") in message
    assert "data/README.md" in message


def test_missing_image_folder_is_named(make_root):
    root = make_root()
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=f"image folder {root / 'val'}"):
        build_dataset("val", make_args(root))


def test_data_path_is_required(sample_root):
    args = make_args(sample_root)
    args.data_path = None
    with pytest.raises(ValueError, match="--data_path"):
        build_dataset("train", args)


def test_missing_image_file_is_named(make_root):
    root = make_root(lambda coco: coco["images"][1].update(file_name="gone.jpg"))
    dataset = build_dataset("val", make_args(root))
    dataset[0]
    with pytest.raises(FileNotFoundError, match=f"image 2: file not found: {root / 'val' / 'gone.jpg'}"):
        dataset[1]


def test_truncated_image_is_named(make_root):
    root = make_root()
    path = root / "val" / "000000000042.jpg"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(OSError, match=f"cannot read image {path} \\(image id 2\\)"):
        build_dataset("val", make_args(root))[1]


def test_image_size_differing_from_the_json_is_named(make_root):
    root = make_root(lambda coco: coco["images"][0].update(width=482))
    with pytest.raises(ValueError, match="000000000036.jpg \\(image id 1\\) is 481x640 px but .* says 482x640"):
        build_dataset("val", make_args(root))[0]


def test_box_outside_its_image_is_refused(make_root):
    def edit(coco):
        coco["annotations"][0]["bbox"] = [481.0, 10.0, 20.0, 20.0]  # image 1 is 481 px wide
        coco["annotations"][4]["bbox"] = [10.0, -40.0, 20.0, 30.0]

    root = make_root(edit)
    with pytest.raises(ValueError) as error:
        build_dataset("val", make_args(root))
    message = str(error.value)
    assert "instances_val.json: 2 annotation(s) whose bbox lies entirely outside its image" in message
    assert "annotation 1 (image 1 of 481x640 px" in message and "annotation 5 (" in message


def test_unknown_categories_are_all_counted_and_the_first_named(make_root):
    def edit(coco):
        for ann in coco["annotations"][:7]:
            ann["category_id"] = 999

    root = make_root(edit)
    with pytest.raises(ValueError) as error:
        build_dataset("val", make_args(root))
    message = str(error.value)
    assert "instances_val.json: 7 annotation(s) with a category_id not in 'categories'" in message
    assert "known ids: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13," in message
    assert "annotation 1 (image 1, category_id 999)" in message and "annotation 5 (" in message
    assert "annotation 6 (" not in message and message.endswith("; ...")


def test_non_finite_box_is_refused(make_root):
    root = make_root(lambda coco: coco["annotations"][2].update(bbox=[10.0, float("nan"), 5.0, 5.0]))
    with pytest.raises(ValueError, match="1 annotation\\(s\\) whose bbox is not 4 finite numbers: annotation 3 "):
        build_dataset("val", make_args(root))


def test_empty_boxes_are_dropped_with_one_warning(make_root):
    def edit(coco):
        coco["annotations"][2]["bbox"][2] = 0.0
        coco["annotations"][4]["bbox"][3] = -1.0

    root = make_root(edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset("val", make_args(root))
    assert len(caught) == 1
    assert "dropped 2 annotation(s) whose box has zero or negative width or height (ids 3, 5)" in str(caught[0].message)
    assert sum(len(target["labels"]) for _, target in dataset) == 17 - 2


def test_crowd_annotations_stay_out_of_the_targets(make_root):
    root = make_root(lambda coco: coco["annotations"][0].update(iscrowd=1))
    dataset = build_dataset("val", make_args(root))
    assert sum(len(target["labels"]) for _, target in dataset) == 17 - 1
    assert len(dataset.coco.getAnnIds(iscrowd=True)) == 1  # still there for COCOeval


def test_box_partly_outside_is_clipped_when_loaded(make_root):
    root = make_root(lambda coco: coco["annotations"][0].update(bbox=[-50.0, 50.0, 300.0, 700.0]))
    raw = CocoDetection(root / "val", root / "annotations" / "instances_val.json", lambda image, target: (image, target))
    torch.testing.assert_close(raw[0][1]["boxes"][0].as_subclass(torch.Tensor), torch.tensor([0.0, 50.0, 250.0, 640.0]))
    image, target = build_dataset("val", make_args(root))[0]
    torch.testing.assert_close(cxcywh_to_xyxy(target["boxes"][0]), torch.tensor([0.0, 50 / 640, 250 / 481, 1.0]))


def test_grayscale_rgba_and_palette_images_become_rgb(make_root, tmp_path, sample_root):
    photo = Image.open(sample_root / "val" / "000000000042.jpg")
    images = {
        "camera.png": Image.open(sample_root / "unlabelled" / "camera.png"),
        "rgba.png": photo.convert("RGBA"),
        "palette.png": photo.convert("P"),
    }
    assert [image.mode for image in images.values()] == ["L", "RGBA", "P"]

    def edit(coco):
        for name, image in images.items():
            add_image(coco, tmp_path, "val", image, name)

    dataset = build_dataset("val", make_args(make_root(edit)))
    loaded = [dataset[index][0] for index in (4, 5, 6)]
    assert all(image.shape[0] == 3 for image in loaded)
    gray = unnormalise(loaded[0])
    torch.testing.assert_close(gray[1], gray[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[2], gray[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_image_without_objects_keeps_an_empty_target(make_root, tmp_path, sample_root, split):
    chelsea = Image.open(sample_root / "unlabelled" / "chelsea.png")
    root = make_root(lambda coco: add_image(coco, tmp_path, split, chelsea, "chelsea.png"), split=split)
    dataset = build_dataset(split, make_args(root))
    assert len(dataset) == 5
    torch.manual_seed(0)
    for _ in range(5):  # train: through flips, resizes and crops
        image, target = dataset[4]
        assert target["image_id"].item() == 5
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == target["area"].shape == target["iscrowd"].shape == (0,)
    filtered = build_dataset(split, make_args(root, "--filter_empty"))
    assert len(filtered) == (4 if split == "train" else 5)  # what is evaluated is never filtered


def test_collate_pads_bottom_right_and_masks_the_padding(sample_root):
    dataset = build_dataset("val", make_args(sample_root))
    batch = [dataset[0], dataset[1]]  # a portrait and a landscape photo
    samples, targets = collate_fn(batch)
    sizes = [tuple(image.shape[-2:]) for image, _ in batch]
    assert samples.tensors.shape == (2, 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for (image, target), (height, width), padded, mask, collated in zip(batch, sizes, samples.tensors, samples.mask, targets):
        assert collated is target
        assert not mask[:height, :width].any() and mask.sum() == mask.numel() - height * width
        assert torch.equal(padded[:, :height, :width], image)
        assert not padded[:, height:].any() and not padded[:, :, width:].any()


def test_image_files_are_found_recursively_by_suffix_in_any_case_and_sorted(tmp_path):
    for name in ("b/2.PNG", "b/1.jpg", "a.JPEG", "notes.txt", "c/d/e.webp", "c/tiles.tif.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.png").mkdir()  # a directory with an image suffix is not a file
    expected = [tmp_path / name for name in ("a.JPEG", "b/1.jpg", "b/2.PNG", "c/d/e.webp")]
    assert image_files(tmp_path) == find_images(tmp_path) == expected
    assert relative_image_files(tmp_path) == [p.relative_to(tmp_path) for p in expected]


def test_find_images_names_the_folder_that_is_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--data_path {tmp_path / 'missing'}: not a directory"):
        find_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        find_images(tmp_path)
    assert image_files(tmp_path) == []
