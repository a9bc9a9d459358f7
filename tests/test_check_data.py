"""The up-front data check (scripts/check_data.py, --check_data) on a broken copy of data/sample:
every problem is listed at once, and a run stops before epoch 0 (or skips them with --skip_bad_samples)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from functools import reduce
from pathlib import Path

import pytest
from conftest import cli_error, load_script
from test_cli import SMALL

from detr_ssl.__main__ import main as train_main
from detr_ssl.data.check import DataReport, check_dataset, check_datasets, dataset_for_check
from detr_ssl.utils.errors import DataError

LOGGER = logging.getLogger("test_check_data")


def broken_sample(tmp_path: Path, sample_root: Path, records: bool = True) -> Path:
    """data/sample with train image 1 truncated, image 2 deleted, image 3's json width wrong and,
    with ``records``, annotations added to image 4 (640x425): 100 outside the image, 101 with a
    negative width, 102 of an unknown category, 103 partly outside (clipped)."""
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    truncated = root / "train" / "000000000009.jpg"
    truncated.write_bytes(truncated.read_bytes()[:20000])
    (root / "train" / "000000000025.jpg").unlink()
    ann_file = root / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    coco["images"][2]["width"] += 1
    if records:
        for ann_id, category, bbox in ((100, 1, [5000, 10, 20, 20]), (101, 1, [10, 10, -5, 20]),
                                       (102, 999, [10, 10, 5, 20]), (103, 1, [-10, 10, 50, 20])):
            coco["annotations"].append({"id": ann_id, "image_id": 4, "category_id": category, "bbox": bbox,
                                        "area": 100.0, "iscrowd": 0})
    ann_file.write_text(json.dumps(coco))
    return root


MISSING = r"1 image file\(s\) not found: \S*000000000025\.jpg \(image id 2\)"
WRONG_SIZE = r"pixel size differs .*: \S*000000000030\.jpg \(image id 3\): is 640x428 px, the json says 641x428"
TRUNCATED = r"do not decode \(truncated or corrupt\): \S*000000000009\.jpg \(image id 1\): OSError: image file is trunc"


def test_the_script_lists_every_problem_at_once_and_only_full_finds_a_truncated_file(tmp_path, sample_root, capsys):
    root = broken_sample(tmp_path, sample_root)
    check_data = load_script("check_data")

    assert check_data.main(["--data_path", str(root)]) == 1
    out = capsys.readouterr().out
    assert ("instances_train.json: 4 images, 14 objects, 80 categories, 1 boxes clipped to the image, "
            "0 empty images") in out
    assert "instances_val.json: 4 images, 17 objects, 80 categories" in out
    assert re.search(r"data check \(quick\) found 4 problem\(s\): \S*instances_train\.json: 2 bad json record\(s\), "
                     r"1 image file\(s\) not found, 1 image\(s\) whose pixel size differs", out), out
    assert re.search(MISSING, out) and re.search(WRONG_SIZE, out)
    assert "entirely outside its image: annotation 100 (image 4" in out
    assert "category_id not in 'categories'" in out and "annotation 102 (image 4, category_id 999)" in out
    assert "note: " in out and "zero or negative width or height (dropped, as always): annotation 101 (image 4" in out
    assert "extends beyond its image (clipped to it): annotation 103 (image 4" in out
    assert "000000000009.jpg" not in out  # quick reads headers, and a truncated JPEG's header still opens

    assert check_data.main(["--data_path", str(root), "--check_data", "full"]) == 1
    out = capsys.readouterr().out
    assert "data check (full) found 5 problem(s)" in out and re.search(TRUNCATED, out), out
    assert re.search(MISSING, out) and re.search(WRONG_SIZE, out) and "annotation 102" in out


def test_the_script_passes_good_data_and_checks_unlabelled_folders(tmp_path, sample_root, capsys):
    check_data = load_script("check_data")
    assert check_data.main(["--data_path", str(sample_root)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("no problems")

    folder = tmp_path / "unlabelled"
    shutil.copytree(sample_root / "unlabelled", folder)
    (folder / "camera.png").write_bytes(b"not a PNG at all" * 100)
    (folder / "rocket.jpg").write_bytes((folder / "rocket.jpg").read_bytes()[:3000])
    argv = ["--data_path", str(folder), "--dataset_file", "folder"]
    assert check_data.main(argv) == 1
    out = capsys.readouterr().out
    assert "unlabelled: 7 images (unlabelled)" in out and "found 1 problem(s)" in out
    assert f"1 image file(s) that do not open as an image: {folder / 'camera.png'}: UnidentifiedImageError" in out
    assert check_data.main([*argv, "--check_data", "full"]) == 1
    out = capsys.readouterr().out
    assert "found 2 problem(s)" in out and f"(truncated or corrupt): {folder / 'rocket.jpg'}: OSError" in out


def test_shards_of_the_check_merge_into_the_whole_report(tmp_path, sample_root):
    dataset = dataset_for_check(broken_sample(tmp_path, sample_root), "coco", "train")
    whole = check_dataset(dataset, "full", progress=False)
    merged = reduce(DataReport.merged, [check_dataset(dataset, "full", (k, 3), progress=False) for k in range(3)])
    assert merged.summary() == whole.summary() and merged.num_problems == whole.num_problems == 5
    assert merged.problem_lines() and sorted(merged.problem_lines()) == sorted(whole.problem_lines())
    assert sorted(merged.note_lines()) == sorted(whole.note_lines())


def test_check_datasets_raises_logs_or_does_nothing(tmp_path, sample_root, caplog):
    dataset = dataset_for_check(broken_sample(tmp_path, sample_root, records=False), "coco", "train")
    assert check_datasets([dataset], "none", skip_bad=False, logger=LOGGER) == []
    with pytest.raises(DataError) as stopped:
        check_datasets([dataset, dataset], "quick", skip_bad=False, logger=LOGGER)
    first, *details = str(stopped.value).splitlines()
    assert first.startswith("data check (quick) found 2 problem(s): ") and first.endswith("--check_data none to "
                                                                                          "start without the check")
    assert len(details) == 2 and re.search(MISSING, details[0]) and re.search(WRONG_SIZE, details[1])
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        reports = check_datasets([dataset], "quick", skip_bad=True, logger=LOGGER)
    assert len(reports) == 1 and "found 2 problem(s)" in caplog.text and "--skip_bad_samples skips" in caplog.text
    assert "instances_train.json: 4 images, 13 objects" in caplog.text


def test_a_run_stops_before_epoch_0_naming_the_problems_or_trains_with_skip_bad_samples(tmp_path, sample_root, capsys):
    root = broken_sample(tmp_path, sample_root, records=False)  # bad records stop the dataset's own validation
    out = tmp_path / "run"
    flags = [*SMALL, "--data_path", str(root), "--output_dir", str(out), "--epochs", "1", "--check_data", "full",
             "--limit_train_batches", "1", "--limit_val_batches", "1", "--no-tensorboard", "--no-augment"]
    error = cli_error(capsys, flags)
    assert re.match(r"error: data check \(full\) found 3 problem\(s\): \S*instances_train\.json: 1 image file\(s\) "
                    r"that do not decode \(truncated or corrupt\), 1 image file\(s\) not found, 1 image\(s\) whose "
                    r"pixel size differs from the json's width and height; fix them, pass --skip_bad_samples", error)
    assert not (out / "checkpoint.pth").exists() and "epoch 0" not in (out / "log.txt").read_text()

    train_main([*flags, "--skip_bad_samples"])  # the missing file is skipped by the dataset, the others by the loader
    log = (out / "log.txt").read_text()
    assert "data check (full) found 2 problem(s)" in log and re.search(TRUNCATED, log) and re.search(WRONG_SIZE, log)
    assert "instances_train.json: 3 images, " in log and (out / "checkpoint.pth").exists()
