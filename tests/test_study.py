"""Label budgets (--train_fraction, --shots), the study runner and the run comparison."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DistributedSampler

from conftest import load_script
from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.data import CocoDetection, ImageFolder, TwoViews, build_dataset
from detr_ssl.data.subsets import (SUBSET_FILE, LabelSubset, apply_label_budget, few_shot_ids, images_by_category,
                                   label_fraction_ids, write_subset_file)
from detr_ssl.utils.errors import ConfigError
from test_ssl_cli import SAMPLE
from test_ssl_cli import TINY as TINY_RUN

REPO = Path(__file__).resolve().parent.parent
TINY = [*TINY_RUN, "--vis_every", "0", "--no-tensorboard"]
STUDY_CONFIGS = REPO / "configs" / "study"


def synthetic_annotations(images: int = 200, seed: int = 0) -> dict:
    """COCO json of ``images`` images: categories 1, 2, 3 common, 7 in only 2 images, 9 in none,
    some empty images and some crowd boxes (which never count)."""
    rng = np.random.default_rng(seed)
    records, anns = [], []
    for image_id in range(1, images + 1):
        records.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 100, "height": 100})
        for category in rng.choice([1, 2, 3], size=rng.integers(0, 4)):
            anns.append({"image_id": image_id, "category_id": int(category), "bbox": [10, 10, 20, 20], "iscrowd": 0})
    anns += [{"image_id": 5, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0},
             {"image_id": 6, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0},
             {"image_id": 8, "category_id": 7, "bbox": [1, 1, 50, 50], "iscrowd": 1}]
    for number, ann in enumerate(anns, 1):
        ann.update(id=number, area=ann["bbox"][2] * ann["bbox"][3])
    categories = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3, 7, 9)]
    return {"images": records, "annotations": anns, "categories": categories}


def coco_of(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def coco() -> COCO:
    return coco_of(synthetic_annotations())


# --- label budgets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.33, 0.5, 1.0])
def test_label_fraction_is_deterministic_sized_and_nested(coco, fraction):
    np.random.seed(123)
    torch.manual_seed(123)
    ids = label_fraction_ids(coco, fraction, seed=0)
    np.random.seed(7)  # the global RNG states play no part
    assert label_fraction_ids(coco, fraction, seed=0) == ids
    assert len(ids) == max(1, round(fraction * 200)) and ids == sorted(set(ids)) and set(ids) <= set(coco.imgs)
    if fraction < 1:
        assert label_fraction_ids(coco, fraction, seed=1) != ids
        assert set(ids) <= set(label_fraction_ids(coco, min(1.0, fraction * 2), seed=0))  # nested for one seed


def test_label_fraction_of_the_sample_is_pinned():
    """The draw is numpy's PCG64 stream: the same ids on every machine (these are the sample's)."""
    coco = CocoDetection(SAMPLE / "train", SAMPLE / "annotations" / "instances_train.json", lambda i, t: (i, t)).coco
    assert [label_fraction_ids(coco, 0.5, seed) for seed in range(3)] == [[1, 3], [1, 2], [3, 4]]
    assert label_fraction_ids(coco, 0.1, 0) == [3]  # at least one image


def test_the_draw_is_the_same_in_another_process(tmp_path, coco):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(synthetic_annotations()))
    code = ("import json, sys; from pycocotools.coco import COCO; from detr_ssl.data.subsets import *; "
            f"c = COCO({str(path)!r}); print(json.dumps([label_fraction_ids(c, 0.1, 4), few_shot_ids(c, 5, 4)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert json.loads(out.splitlines()[-1]) == [label_fraction_ids(coco, 0.1, 4), few_shot_ids(coco, 5, 4)]


@pytest.mark.parametrize("shots", [1, 5, 10])
def test_few_shot_gives_every_category_k_images_where_it_can(coco, shots):
    ids = few_shot_ids(coco, shots, seed=3)
    assert few_shot_ids(coco, shots, seed=3) == ids and few_shot_ids(coco, shots, seed=4) != ids
    available = images_by_category(coco)
    chosen = images_by_category(coco, ids)
    for category, images in available.items():
        assert len(chosen[category]) >= min(shots, len(images)), category
    assert set(chosen[7]) <= {5, 6}  # the rare class: image 8's crowd box does not count
    if shots > 1:
        assert chosen[7] == [5, 6]  # all it has
    assert chosen[9] == [] and len(ids) <= shots * len(available)
    assert len(ids) < 200


def test_few_shot_draws_only_among_the_given_images(coco):
    among = list(range(1, 101))
    ids = few_shot_ids(coco, 3, seed=0, among=among)
    assert set(ids) <= set(among) and 5 in ids and 6 in ids
    assert set(label_fraction_ids(coco, 0.5, 0, among=among)) <= set(among)


def tiny_args(*flags: str):
    return parse_args([*TINY, "--data_path", str(SAMPLE), *flags])


def test_the_subset_is_chosen_before_the_sampler_splits_it():
    """Every process builds the same subset; the DistributedSampler then splits it, so the ranks
    together train on exactly the chosen images, for any number of processes."""
    dataset = build_dataset("train", tiny_args("--train_fraction", "0.5", "--fraction_seed", "2"))
    assert isinstance(dataset, LabelSubset) and len(dataset) == 2
    chosen = dataset.record["image_ids"]
    assert [dataset.dataset.ids[i] for i in dataset.indices] == chosen
    assert chosen == label_fraction_ids(dataset.dataset.coco, 0.5, 2)
    for world_size in (1, 2, 3):
        again = build_dataset("train", tiny_args("--train_fraction", "0.5", "--fraction_seed", "2"))
        seen = set()
        for rank in range(world_size):
            sampler = DistributedSampler(again, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
            seen |= {again.dataset.ids[again.indices[i]] for i in sampler}
        assert sorted(seen) == chosen, world_size


def test_validation_data_stays_whole_and_json_is_written(tmp_path):
    args = tiny_args("--shots", "1", "--fraction_seed", "1")
    train = build_dataset("train", args)
    val = build_dataset("val", args)
    assert isinstance(val, CocoDetection) and len(val) == 4
    path = write_subset_file(train, tmp_path)
    record = json.loads(path.read_text())
    assert path.name == SUBSET_FILE and record["rule"] == "shots" and record["shots"] == 1
    assert record["fraction_seed"] == 1 and record["images"] == len(record["image_ids"]) == len(train)
    assert record["categories"]["55"] == {"name": "orange", "images": 1, "objects": 4, "available_images": 1}
    assert write_subset_file(val, tmp_path / "none") is None  # no budget: no file


def test_two_view_sets_hold_the_subset_under_their_views(tmp_path):
    train = build_dataset("train", tiny_args("--train_fraction", "0.5"), views=2)
    assert isinstance(train, TwoViews) and isinstance(train.dataset, LabelSubset) and len(train) == 2
    assert json.loads(write_subset_file(train, tmp_path).read_text())["image_ids"] == [1, 3]


def test_a_folder_has_no_labels_to_budget(capsys):
    with pytest.raises(ConfigError, match="--dataset_file folder"):
        apply_label_budget(ImageFolder(SAMPLE / "unlabelled"), parse_args(["--train_fraction", "0.5"]))
    message = flag_error(capsys, ["--ssl_task", "mim_continuous", "--ssl_mode", "pretrain", "--dataset_file", "folder",
                                  "--data_path", str(SAMPLE / "unlabelled"), "--train_fraction", "0.5"])
    assert "--dataset_file folder" in message and "--train_fraction" in message


def flag_error(capsys, flags: list[str]) -> str:
    """The one error line with which parsing ``flags`` stops."""
    with pytest.raises(SystemExit):
        parse_args(flags)
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--train_fraction", "0"], "--train_fraction must be in (0, 1]"),
    (["--train_fraction", "1.5"], "--train_fraction must be in (0, 1]"),
    (["--shots", "0"], "--shots must be >= 1"),
    (["--shots", "5", "--train_fraction", "0.5"], "give one"),
    (["--fraction_seed", "-1"], "--fraction_seed must be >= 0"),
])
def test_impossible_budgets_fail_before_any_work(capsys, flags, message):
    assert message in flag_error(capsys, [*TINY, "--data_path", str(SAMPLE), *flags])


def test_a_run_with_half_the_labels_trains_on_them_and_says_which(tmp_path):
    main([*TINY, "--data_path", str(SAMPLE), "--output_dir", str(tmp_path), "--train_fraction", "0.5"])
    record = json.loads((tmp_path / SUBSET_FILE).read_text())
    assert record["rule"] == "train_fraction" and record["train_fraction"] == 0.5 and record["image_ids"] == [1, 3]
    log = (tmp_path / "log.txt").read_text()
    assert "--train_fraction 0.5 (--fraction_seed 0): training on 2 of 4 labelled images (ids 1, 3)" in log
    assert "training from epoch 0 to 0 on 2 images" in log
    assert "val_AP" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])


# --- compare_runs ----------------------------------------------------------------------------------

def write_run(run_dir: Path, aps: list[float | None], **config) -> Path:
    """A run folder as main.py leaves it: log.jsonl (runner.log_epoch's keys; None = not evaluated
    that epoch) and config.yaml."""
    run_dir.mkdir(parents=True)
    lines = []
    for epoch, ap in enumerate(aps):
        record = {"epoch": epoch, "seconds": 1.0, "train_loss": 5.0 - epoch, "train_lr": 1e-4}
        if ap is not None:
            record.update(val_AP=ap, val_AP50=min(1.0, 2 * ap), val_AP75=ap / 2, val_APs=-1.0, val_APm=ap,
                          val_APl=ap + 0.1, val_loss=6.0 - epoch)
        lines.append(json.dumps(record))
    (run_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    config = {"ssl_task": "none", "ssl_method": "none", "pretrain": "", "finetune": "", "train_fraction": 1.0,
              "shots": None, "epochs": len(aps), **config}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def picture_ok(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20  # lines, bands, text: not a blank canvas


def summary_rows(text: str, section: str) -> dict[str, list[str]]:
    """{row name: cells} of one table of summary.md."""
    block = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


@pytest.fixture
def fake_study(tmp_path) -> Path:
    """A study folder: a baseline cell and a pre-trained cell of 2 folds each, a pending fold, a pre-training."""
    study = tmp_path / "study"
    folds = {"ssl_task-none": [[0.1, 0.2, 0.3], [0.1, 0.3, 0.5]],
             "ssl_task-mim_continuous": [[0.2, 0.5, 0.4], [0.3, 0.45, 0.42]]}
    runs = [{"name": "pretrain__ssl_task-mim_continuous", "kind": "pretrain", "cell": "pretrain", "status": "done",
             "output_dir": str(study / "pretrain__ssl_task-mim_continuous")}]
    for cell, curves in folds.items():
        for fold, aps in enumerate(curves):
            name = f"{cell}__fold-{fold}"
            extra = {"pretrain": "x.pth"} if "mim" in cell else {}
            write_run(study / name, aps, train_fraction=0.5, fraction_seed=fold, **extra)
            runs.append({"name": name, "kind": "finetune", "cell": cell, "fold": fold, "status": "done",
                         "output_dir": str(study / name)})
    runs.append({"name": "ssl_task-none__fold-2", "kind": "finetune", "cell": "ssl_task-none", "fold": 2,
                 "status": "pending", "output_dir": str(study / "ssl_task-none__fold-2")})
    (study / "study.json").write_text(json.dumps({"runs": runs}))
    return study


def test_compare_aggregates_the_folds_of_a_study(fake_study, tmp_path):
    compare = load_script("compare_runs")
    assert compare.main([str(fake_study), "--out", str(tmp_path / "report")]) == 0
    picture_ok(tmp_path / "report" / "ap_curves.png", (1100, 420))
    picture_ok(tmp_path / "report" / "loss_curves.png", (700, 420))
    text = (tmp_path / "report" / "summary.md").read_text()
    final, best = summary_rows(text, "Final"), summary_rows(text, "Best")
    # baseline: final APs 0.3, 0.5 -> 0.400 +- 0.141 (sample std); AP75 = AP / 2; no small objects
    assert final["ssl_task-none"][:6] == ["2", "3", "0.400 ± 0.141", "0.800 ± 0.283", "0.200 ± 0.071", "n/a"]
    assert final["ssl_task-mim_continuous"][2] == "0.410 ± 0.014"
    assert best["ssl_task-mim_continuous"][2] == "0.475 ± 0.035" and best["ssl_task-none"][2] == "0.400 ± 0.141"
    # 90% of the baseline's 0.4 = 0.36: the mean curves reach it after 2 (pre-trained) and 3 epochs
    assert final["ssl_task-mim_continuous"][-2:] == ["ssl_task-none", "2"]
    assert final["ssl_task-none"][-2:] == ["ssl_task-none", "3"]
    assert "ssl_task-none__fold-2 (pending)" in text and "pretrain" not in final


def test_compare_single_runs_with_a_named_baseline_and_sparse_evaluations(tmp_path):
    compare = load_script("compare_runs")
    base = write_run(tmp_path / "base", [None, 0.2, None, 0.4])
    tuned = write_run(tmp_path / "tuned", [None, 0.1, None, 0.3], ssl_task="jigsaw_continuous")
    compare.main([str(base), str(tuned), "--out", str(tmp_path / "report"), "--reach", "0.5"])
    final = summary_rows((tmp_path / "report" / "summary.md").read_text(), "Final")
    assert final["base"][:3] == ["1", "4", "0.400"] and final["tuned"][2] == "0.300"
    assert final["tuned"][-2:] == ["base", "4"] and final["base"][-1] == "2"  # 0.2 >= 0.5 * 0.4 after 2 epochs
    compare.main([str(base), str(tuned), "--out", str(tmp_path / "r2"), "--baseline", "tuned"])
    final = summary_rows((tmp_path / "r2" / "summary.md").read_text(), "Final")
    assert final["base"][-2:] == ["tuned", "4"]  # 0.9 * 0.3 = 0.27: reached at epoch 3 (0.4)
    with pytest.raises(SystemExit, match="--baseline nope"):
        compare.main([str(base), "--out", str(tmp_path / "r3"), "--baseline", "nope"])
    picture_ok(tmp_path / "report" / "ap_curves.png", (1100, 420))


# --- run_study -------------------------------------------------------------------------------------

def dry_run(capsys, tmp_path, *argv: str) -> tuple[list[str], dict]:
    study = load_script("run_study")
    assert study.main(["--out", str(tmp_path / "study"), "--dry_run", *argv]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    return lines, json.loads((tmp_path / "study" / "study.json").read_text())


def test_dry_run_expands_the_grid_folds_and_shared_pretrainings(capsys, tmp_path):
    lines, study = dry_run(capsys, tmp_path, "--config", str(STUDY_CONFIGS / "sample_finetune.yaml"),
                           "--pretrain_config", str(STUDY_CONFIGS / "sample_pretrain.yaml"),
                           "--grid", "ssl_task=none,mim_continuous,jigsaw_continuous",
                           "--grid", "train_fraction=0.5,1", "--folds", "3", "--", "--epochs", "2")
    runs = {run["name"]: run for run in study["runs"]}
    pretrains = [name for name, run in runs.items() if run["kind"] == "pretrain"]
    assert pretrains == ["pretrain__ssl_task-mim_continuous", "pretrain__ssl_task-jigsaw_continuous"]
    fraction_cells = [f"ssl_task-{t}__train_fraction-0.5__fold-{f}" for t in ("none", "mim_continuous",
                                                                              "jigsaw_continuous") for f in range(3)]
    full_cells = [f"ssl_task-{t}__train_fraction-1__fold-0" for t in ("none", "mim_continuous", "jigsaw_continuous")]
    assert set(runs) == {*pretrains, *fraction_cells, *full_cells}  # full labels: one fold (all seeds alike)
    assert len(lines) == len(runs) and all(run["status"] == "pending" for run in runs.values())
    assert list(runs).index("pretrain__ssl_task-jigsaw_continuous") < list(runs).index(fraction_cells[0])
    mim = runs["ssl_task-mim_continuous__train_fraction-0.5__fold-2"]
    assert mim["pretrain"] == "pretrain__ssl_task-mim_continuous"
    assert mim["cell"] == "ssl_task-mim_continuous__train_fraction-0.5"
    assert mim["grid"] == {"ssl_task": "mim_continuous", "train_fraction": "0.5"} and mim["fold"] == 2
    command = mim["command"]
    assert command[command.index("--config") + 1].endswith("sample_finetune.yaml") and "--ssl_task" not in command
    assert command[command.index("--pretrain") + 1] == str(tmp_path / "study" / "pretrain__ssl_task-mim_continuous" /
                                                           "checkpoint.pth")
    assert command[-2:] == ["--output_dir", mim["output_dir"]] and mim["output_dir"].endswith(mim["name"])
    assert command[command.index("--fraction_seed") + 1] == "2" and "--epochs" in command
    pre = runs["pretrain__ssl_task-mim_continuous"]["command"]
    assert pre[pre.index("--config") + 1].endswith("sample_pretrain.yaml")
    assert pre[pre.index("--ssl_task") + 1] == "mim_continuous" and "--fraction_seed" not in pre
    baseline = runs["ssl_task-none__train_fraction-1__fold-0"]
    assert baseline["pretrain"] is None and "--pretrain" not in baseline["command"]


def test_without_a_pretrain_config_the_task_joins_the_run_and_launchers_wrap_it(capsys, tmp_path):
    lines, study = dry_run(capsys, tmp_path, "--config", str(STUDY_CONFIGS / "sample_finetune.yaml"),
                           "--grid", "ssl_task=none,jigsaw_continuous", "--grid", "augment=true,false",
                           "--launcher", "sbatch", "--launcher_args", "--partition gpu", "--", "--shots", "1")
    names = [run["name"] for run in study["runs"]]
    assert names == [f"ssl_task-{task}__augment-{on}__fold-0" for task in ("none", "jigsaw_continuous")
                     for on in ("true", "false")]
    command = study["runs"][3]["command"]
    assert command[:6] == ["sbatch", "--wait", "--job-name", names[3], "--output",
                           str(Path(study["runs"][3]["output_dir"]) / "slurm-%j.out")]
    assert command[6:8] == ["--partition", "gpu"] and command[8] == "--wrap"
    assert "--shots 1 --ssl_task jigsaw_continuous --no-augment --fraction_seed 0" in command[9]
    assert "--pretrain" not in command[9]
    study = load_script("run_study")
    run = study.Run("r", "finetune", "r", {}, 0, "out/r", ["--epochs", "1"])
    torchrun = study.launch_command(run, ["--epochs", "1"], "torchrun", ["--nproc_per_node", "2"])
    assert torchrun[:3] == ["torchrun", "--nproc_per_node", "2"] and torchrun[3].endswith("main.py")


@pytest.mark.parametrize("argv, message", [
    (["--grid", "nonsense=1,2"], "'nonsense' is not a main.py flag"),
    (["--grid", "fraction_seed=1,2"], "use --folds"),
    (["--grid", "augment=maybe"], "true or false"),
    (["--grid", "ssl_task"], "expected KEY=V1,V2"),
])
def test_bad_grids_are_refused_by_name(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        load_script("run_study").main(["--config", str(STUDY_CONFIGS / "sample_finetune.yaml"), "--out", str(tmp_path),
                                       "--dry_run", *argv])


def test_finished_runs_are_skipped_and_interrupted_ones_resume(capsys, tmp_path):
    argv = ["--config", str(STUDY_CONFIGS / "sample_finetune.yaml"), "--grid", "train_fraction=0.5", "--folds", "3",
            "--", "--epochs", "3"]
    out = tmp_path / "study"
    write_run(out / "train_fraction-0.5__fold-0", [0.1, 0.2, 0.3], epochs=3)  # finished
    write_run(out / "train_fraction-0.5__fold-1", [0.1], epochs=3)  # interrupted after epoch 0
    (out / "train_fraction-0.5__fold-1" / "checkpoint.pth").write_bytes(b"")
    lines, study = dry_run(capsys, tmp_path, *argv)
    runs = {run["name"]: run for run in study["runs"]}
    assert runs["train_fraction-0.5__fold-0"]["status"] == "skipped" and len(lines) == 2
    resumed = runs["train_fraction-0.5__fold-1"]["command"]
    assert resumed[resumed.index("--resume") + 1] == str(out / "train_fraction-0.5__fold-1" / "checkpoint.pth")
    assert "--resume" not in runs["train_fraction-0.5__fold-2"]["command"]


def test_a_tiny_study_runs_end_to_end_and_compares(tmp_path):
    """Pre-training once on the unlabelled photos, fine-tunes of half the labels in two folds, for a
    baseline and the pre-trained cell; then the comparison of the study folder."""
    out = tmp_path / "study"
    argv = ["--config", str(STUDY_CONFIGS / "sample_finetune.yaml"),
            "--pretrain_config", str(STUDY_CONFIGS / "sample_pretrain.yaml"), "--grid", "ssl_task=none,mim_continuous",
            "--folds", "2", "--out", str(out), "--", *TINY, "--train_fraction", "0.5"]
    study_script = load_script("run_study")
    assert study_script.main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert [(run["name"], run["status"]) for run in study["runs"]] == [
        ("pretrain__ssl_task-mim_continuous", "done"), ("ssl_task-none__fold-0", "done"),
        ("ssl_task-none__fold-1", "done"), ("ssl_task-mim_continuous__fold-0", "done"),
        ("ssl_task-mim_continuous__fold-1", "done")]
    subsets = [json.loads((out / f"ssl_task-none__fold-{fold}" / SUBSET_FILE).read_text()) for fold in (0, 1)]
    assert [s["image_ids"] for s in subsets] == [[1, 3], [1, 2]] and subsets[1]["fraction_seed"] == 1
    assert "loaded" in (out / "ssl_task-mim_continuous__fold-1" / "log.txt").read_text()  # from the pre-training
    assert study_script.main(argv) == 0  # again: everything finished, nothing runs
    assert {run["status"] for run in json.loads((out / "study.json").read_text())["runs"]} == {"skipped"}
    load_script("compare_runs").main([str(out), "--out", str(out / "report")])
    for name in ("ap_curves.png", "loss_curves.png", "summary.md"):
        assert (out / "report" / name).is_file()
    final = summary_rows((out / "report" / "summary.md").read_text(), "Final")
    assert set(final) == {"ssl_task-none", "ssl_task-mim_continuous"} and final["ssl_task-mim_continuous"][0] == "2"
    assert final["ssl_task-mim_continuous"][-2] == "ssl_task-none"
