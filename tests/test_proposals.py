"""Pseudo-boxes: scripts/propose_boxes.py (DETReg's rule, deterministic, resumable), reading them back
(load_proposals, ImageFolder), the boxes through the training transforms, and the two-view pipeline."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import REPO_ROOT, load_script
from detr_ssl import __version__
from detr_ssl.data import (ImageFolder, TwoViews, build_dataset, build_transforms, build_view_transforms,
                           collate_fn, collate_for, collate_views, load_proposals)
from detr_ssl.data.proposals import ProposalSettings, image_seed, require_selective_search, selective_search
from detr_ssl.utils.box_ops import cxcywh_to_xyxy
from detr_ssl.utils.errors import ConfigError, DataError
from detr_ssl.utils.image import IMAGENET_MEAN, IMAGENET_STD, denormalize

# Three small real photos; two in subfolders, so file_name is a relative path.
PHOTOS = {"a/chelsea.png": "chelsea.png", "b/rocket.jpg": "rocket.jpg", "coins.png": "coins.png"}
MIN_SIZE = 40  # drops some of chelsea.png's first 20 boxes
SS_FLAGS = ["--top_k", "20", "--min_size", str(MIN_SIZE), "--resize", "128", "--seed", "3"]
VIEW_SIZES_320 = {256, 269, 282, 294, 307, 320}  # AlignDet's 640..800 step 32, times 320 / 800


@pytest.fixture(scope="module")
def script() -> types.ModuleType:
    return load_script("propose_boxes")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_root) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, source in PHOTOS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_root / "unlabelled" / source, root / name)
    return root


def propose(script, images: Path, out: Path, *flags: str) -> dict:
    assert script.main(["--images", str(images), "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ss_json(script, photos, tmp_path_factory) -> Path:
    """Selective-search proposals of the photos, computed in this process with one worker (the tests
    that use them skip without OpenCV's contrib modules; the dev extra installs them)."""
    pytest.importorskip("cv2.ximgproc", reason="selective search needs opencv-contrib-python-headless")
    out = tmp_path_factory.mktemp("ss") / "proposals.json"
    propose(script, photos, out, *SS_FLAGS, "--workers", "1")
    return out


def boxes_by_image(coco: dict) -> dict[int, list[list[float]]]:
    """Each image's bboxes in file order, after checking that the file lists them by rank."""
    boxes: dict[int, list] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        assert annotation["rank"] == len(boxes[annotation["image_id"]])
        boxes[annotation["image_id"]].append(annotation["bbox"])
    return boxes


def assert_valid(coco: dict, top_k: int, min_size: float) -> None:
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    assert coco["categories"] == [{"id": 1, "name": "object"}]
    for image_id, boxes in boxes_by_image(coco).items():
        width, height = sizes[image_id]
        assert 0 < len(boxes) <= top_k
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
            assert w >= min_size and h >= min_size
    for image_id in sizes:
        scores = [a["score"] for a in coco["annotations"] if a["image_id"] == image_id]
        assert scores[0] == 1.0 and all(a > b for a, b in zip(scores, scores[1:]))


def test_defaults_are_detregs_rule(script):
    args = script.build_parser().parse_args(["--images", "x", "--out", "y"])
    assert script.settings_from(script.build_parser(), args) == ProposalSettings("selective_search", 30, 0.0, 128, 0)


def test_selective_search_keeps_the_first_top_k_of_its_ranking_at_least_min_size(ss_json, photos):
    coco = json.loads(ss_json.read_text())
    assert coco["info"] | {"opencv": None} == {"method": "selective_search", "top_k": 20, "min_size": 40.0,
                                                "resize": 128, "seed": 3, "tool": "scripts/propose_boxes.py",
                                                "version": __version__, "opencv": None}
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == list(enumerate(sorted(PHOTOS)))
    assert_valid(coco, top_k=20, min_size=MIN_SIZE)
    chelsea = np.asarray(Image.open(photos / "a" / "chelsea.png").convert("RGB"))
    height, width = chelsea.shape[:2]
    raw = selective_search(chelsea, resize=128, seed=image_seed(3, 0))
    # Found on a 128 x 128 copy: every coordinate is a whole pixel of it, scaled back.
    on_copy = raw * 128 / np.array([width, height, width, height])
    np.testing.assert_allclose(on_copy, on_copy.round(), atol=1e-6)
    assert ((raw[:20, 2:] - raw[:20, :2]) < MIN_SIZE).any(), "nothing to filter: the test would not see the filter"
    kept = [box for box in raw if (box[2:] - box[:2] >= MIN_SIZE).all()][:20]
    expected = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in kept]
    np.testing.assert_allclose(boxes_by_image(coco)[0], expected, atol=1e-4)


def test_selective_search_output_is_the_same_for_any_workers_and_process(script, ss_json, photos, tmp_path):
    again = tmp_path / "again.json"
    propose(script, photos, again, *SS_FLAGS, "--workers", "1")
    pooled = tmp_path / "pooled.json"
    propose(script, photos, pooled, *SS_FLAGS, "--workers", "2")
    assert again.read_bytes() == pooled.read_bytes() == ss_json.read_bytes()
    # The command line, end to end, in a fresh process.
    command = [sys.executable, str(REPO_ROOT / "scripts" / "propose_boxes.py"), "--images", str(photos),
               "--out", str(tmp_path / "cli.json"), *SS_FLAGS, "--workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    assert (tmp_path / "cli.json").read_bytes() == ss_json.read_bytes()
    assert not (tmp_path / "cli.json.partial.jsonl").exists()
    proposals = load_proposals(tmp_path / "cli.json", photos)
    for index, boxes in boxes_by_image(json.loads(ss_json.read_text())).items():
        xyxy = torch.tensor(boxes) @ torch.tensor([[1., 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]])
        image = Image.open(photos / sorted(PHOTOS)[index])
        torch.testing.assert_close(proposals.boxes_for(index, image.height, image.width), xyxy)


def test_an_interrupted_run_resumes_where_it_stopped(script, ss_json, photos, tmp_path, monkeypatch):
    out = tmp_path / "proposals.json"
    real, calls = script.propose, []

    def stop_at_second(task, settings):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(task[0])
        return real(task, settings)

    monkeypatch.setattr(script, "propose", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--images", str(photos), "--out", str(out), *SS_FLAGS, "--workers", "1"])
    partial = tmp_path / "proposals.json.partial.jsonl"
    assert not out.exists() and len(partial.read_text().splitlines()) == 2  # the header and image 0
    with partial.open("a") as sink:
        sink.write('{"index": 1, "file_na')  # a line cut off mid-write

    def count(task, settings):
        calls.append(task[0])
        return real(task, settings)

    monkeypatch.setattr(script, "propose", count)
    propose(script, photos, out, *SS_FLAGS, "--workers", "1")
    assert calls == [0, 1, 2]  # image 0 once, before the interruption
    assert out.read_bytes() == ss_json.read_bytes() and not partial.exists()


def test_a_rerun_with_other_arguments_is_refused(script, photos, tmp_path, monkeypatch, capsys):
    out, flags = tmp_path / "proposals.json", ["--images", str(photos), "--method", "random", "--workers", "1"]
    def interrupted(task, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "propose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main([*flags, "--out", str(out), "--top_k", "20"])
    with pytest.raises(SystemExit) as stopped:
        script.main([*flags, "--out", str(out), "--top_k", "5"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and not out.exists()
    assert f"{out}.partial.jsonl holds an interrupted run with" in err
    assert "--top_k 20" in err and "--top_k 5" in err and "delete the file to start over" in err


def test_random_boxes_are_seeded_per_image_and_inside(script, photos, tmp_path):
    flags = ["--method", "random", "--top_k", "7", "--min_size", "24"]
    one = propose(script, photos, tmp_path / "one.json", *flags, "--workers", "1")
    two = propose(script, photos, tmp_path / "two.json", *flags, "--workers", "2")
    other = propose(script, photos, tmp_path / "other.json", *flags, "--seed", "1", "--workers", "1")
    assert one == two and one["info"]["method"] == "random" and "opencv" not in one["info"]
    assert_valid(one, top_k=7, min_size=24)
    assert len(one["annotations"]) == 3 * 7
    assert boxes_by_image(one) != boxes_by_image(other)


def test_unreadable_images_are_left_out_and_listed(script, photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "broken.png").write_bytes(b"not a PNG at all")
    coco = propose(script, folder, tmp_path / "p.json", "--method", "random", "--top_k", "3", "--workers", "1")
    assert [image["file_name"] for image in coco["images"]] == sorted(PHOTOS)
    assert f"1 unreadable image(s) left out of {tmp_path / 'p.json'}:\n  cannot read image {folder / 'broken.png'}" in \
        capsys.readouterr().err
    assert load_proposals(tmp_path / "p.json", folder).missing == 1


def test_missing_opencv_contrib_names_the_pip_command(script, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "cv2.ximgproc", raising=False)
    for stand_in in (None, types.ModuleType("cv2")):  # no OpenCV; OpenCV without the contrib modules
        monkeypatch.setitem(sys.modules, "cv2", stand_in)
        with pytest.raises(ConfigError, match=r"pip install opencv-contrib-python-headless .*--method random"):
            require_selective_search()
    with pytest.raises(SystemExit):
        script.main(["--images", str(photos), "--out", str(tmp_path / "p.json")])
    assert "pip install opencv-contrib-python-headless" in capsys.readouterr().err
    propose(script, photos, tmp_path / "random.json", "--method", "random", "--workers", "1")


def to_pixels(target: dict) -> torch.Tensor:
    height, width = target["size"].tolist()
    return cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])


def test_pseudo_boxes_move_with_flips_and_resizes_and_crops_drop_them_in_step(ss_json, photos):
    proposals = load_proposals(ss_json, photos)
    dataset = ImageFolder(photos, build_transforms("train", 320, 480), proposals=proposals)
    index = 0  # chelsea, 451 x 300
    image = Image.open(dataset.files[index]).convert("RGB")
    original = proposals.boxes_for(index, image.height, image.width)
    torch.manual_seed(0)
    flips, cropped_away = set(), 0
    for _ in range(40):
        out, target = dataset[index]
        ids, count = target["proposal_ids"], len(target["boxes"])
        assert len(target["labels"]) == len(target["iscrowd"]) == len(ids) == count
        assert (target["labels"] == 0).all() and (target["iscrowd"] == 0).all()
        assert ids.tolist() == sorted(set(ids.tolist())) and (ids < len(original)).all()
        height, width = out.shape[-2:]
        reference = F.normalize(F.to_dtype(F.resize(F.pil_to_tensor(image), [height, width]), torch.float32,
                                           scale=True), IMAGENET_MEAN, IMAGENET_STD)
        error, mirrored_error = (out - reference).abs().mean(), (out - reference.flip(-1)).abs().mean()
        if min(error, mirrored_error) > 0.02:  # the crop branch
            cropped_away += count < len(original)
            continue
        flipped = bool(mirrored_error < error)
        flips.add(flipped)
        assert count == len(original)
        expected = original * torch.tensor([width / image.width, height / image.height] * 2)
        if flipped:
            expected = torch.stack([width - expected[:, 2], expected[:, 1], width - expected[:, 0], expected[:, 3]], 1)
        torch.testing.assert_close(to_pixels(target), expected, atol=1e-3, rtol=0)
    assert flips == {False, True} and cropped_away > 0


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_two_views_keep_every_box_where_it_was(ss_json, photos):
    proposals = load_proposals(ss_json, photos)
    views = TwoViews(ImageFolder(photos, proposals=proposals), build_view_transforms(320, 480))
    torch.manual_seed(0)
    flips = set()
    for index in range(len(views)):
        image = Image.open(views.dataset.files[index]).convert("RGB")
        original = proposals.boxes_for(index, image.height, image.width)
        original = original / torch.tensor([image.width, image.height] * 2)
        pixels = F.pil_to_tensor(image).float()
        for _ in range(3):
            (first, t1), (second, t2) = views[index]
            assert first.shape != second.shape or not torch.equal(first, second)
            assert (t1["view"].item(), t2["view"].item()) == (0, 1)
            for view, target in ((first, t1), (second, t2)):
                assert target["image_id"].item() == index
                assert target["proposal_ids"].tolist() == list(range(len(original)))  # no crop: none lost
                assert min(view.shape[-2:]) in VIEW_SIZES_320 or max(view.shape[-2:]) == 480
                gray = denormalize(view).mean(0)
                reference = F.resize(pixels, list(view.shape[-2:])).mean(0)
                straight, mirrored = correlation(gray, reference), correlation(gray, reference.flip(-1))
                assert max(straight, mirrored) > 0.9 > 0.7 > min(straight, mirrored)
                flipped = mirrored > straight
                flips.add(flipped)
                back = cxcywh_to_xyxy(target["boxes"])
                if flipped:
                    back = torch.stack([1 - back[:, 2], back[:, 1], 1 - back[:, 0], back[:, 3]], 1)
                torch.testing.assert_close(back, original, atol=1e-4, rtol=0)
    assert flips == {False, True}


def test_collate_views_puts_all_first_views_before_all_second_views(ss_json, photos):
    views = TwoViews(ImageFolder(photos, proposals=load_proposals(ss_json, photos)), build_view_transforms(160, 240))
    torch.manual_seed(0)
    pairs = [views[i] for i in range(3)]
    samples, targets = collate_views(pairs)
    assert samples.tensors.shape[0] == 6
    assert [(t["image_id"].item(), t["view"].item()) for t in targets] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1),
                                                                            (2, 1)]
    for position, (image, target) in enumerate([pair[0] for pair in pairs] + [pair[1] for pair in pairs]):
        height, width = image.shape[-2:]
        assert targets[position] is target
        assert torch.equal(samples.tensors[position, :, :height, :width], image)
        assert not samples.mask[position, :height, :width].any()


def folder_args(photos: Path, proposals: Path | None, **overrides) -> argparse.Namespace:
    values = dict(data_path=str(photos), dataset_file="folder", min_size=160, max_size=240, augment=True,
                  skip_bad_samples=False, val_path=None, proposals=proposals, val_proposals=None, proposal_top_k=5)
    return argparse.Namespace(**(values | overrides))


def test_build_dataset_reads_proposals_and_gives_the_views_asked_for(ss_json, photos):
    """--proposals for the --data_path images, --val_proposals for --val_path's, none without them;
    two views where the method asks for them (its validation batches too), else one."""
    args = folder_args(photos, ss_json)
    train, val = build_dataset("train", args, views=2), build_dataset("val", args, views=2)
    assert isinstance(train, TwoViews) and isinstance(val, TwoViews)
    assert isinstance(build_dataset("val", args), ImageFolder)
    assert collate_for(2) is collate_views and collate_for(1) is collate_fn
    (_, first), (_, second) = train[0]
    assert first["proposal_ids"].tolist() == second["proposal_ids"].tolist() == list(range(5))
    _, target = build_dataset("val", args)[0]
    assert target["proposal_ids"].tolist() == list(range(5))
    _, held_out = build_dataset("val", folder_args(photos, ss_json, val_path=str(photos), val_proposals=ss_json))[0]
    assert held_out["proposal_ids"].tolist() == list(range(5))
    for plain_args in (folder_args(photos, None), folder_args(photos, ss_json, val_path=str(photos))):
        _, plain = build_dataset("val", plain_args)[0]
        assert "proposal_ids" not in plain and len(plain["boxes"]) == 0
    with pytest.raises(ConfigError, match="--proposals .* --dataset_file folder"):
        build_dataset("train", folder_args(photos, ss_json, dataset_file="coco"))


def edited(ss_json: Path, tmp_path: Path, edit) -> Path:
    coco = json.loads(ss_json.read_text())
    edit(coco)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.pop("annotations"), "missing field 'annotations'"),
    (lambda c: c["annotations"][3].pop("bbox"), r"annotations\[3\]: missing field 'bbox'"),
    (lambda c: c["images"][1].pop("width"), r"images\[1\]: missing field 'width'"),
    (lambda c: c["annotations"][0].update(bbox=[440.0, 10.0, 20.0, 20.0]),
     r"annotations\[0\]\.bbox \[440.0, 10.0, 20.0, 20.0\]: outside its image chelsea.png \(451x300 px\)"),
    (lambda c: c["images"][2].update(file_name="nowhere/coins.png"),
     r"images\[2\]\.file_name 'nowhere/coins.png': no such image under"),
    (lambda c: c["annotations"][0].update(rank="first"), r"annotations\[0\]\.rank 'first': expected an integer"),
], ids=["no annotations", "no bbox", "no width", "box outside", "unknown file", "bad rank"])
def test_bad_proposal_files_are_named_with_the_field(ss_json, photos, tmp_path, edit, message):
    path = edited(ss_json, tmp_path, edit)
    with pytest.raises(DataError, match=message) as raised:
        load_proposals(path, photos)
    assert str(path) in str(raised.value)


def test_images_without_entries_get_no_boxes_and_are_counted(ss_json, photos, tmp_path, caplog):
    def drop_image_1(coco):
        coco["images"] = [i for i in coco["images"] if i["id"] != 1]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]

    proposals = load_proposals(edited(ss_json, tmp_path, drop_image_1), photos, top_k=4)
    assert proposals.missing == 1 and "lists no entry for 1 of the 3 images" in caplog.text
    dataset = ImageFolder(photos, proposals=proposals)
    assert [len(dataset[i][1]["boxes"]) for i in range(3)] == [4, 0, 4]


def test_an_image_of_another_size_than_the_json_says_is_an_error(ss_json, photos, tmp_path):
    path = edited(ss_json, tmp_path, lambda coco: coco["images"][0].update(width=452))
    dataset = ImageFolder(photos, proposals=load_proposals(path, photos))
    with pytest.raises(DataError, match=r"chelsea.png is 451x300 px, but .* gives 452x300"):
        dataset[0]
