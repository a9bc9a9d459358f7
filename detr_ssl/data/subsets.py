"""Label budgets: train on a fraction of the labelled images (``--train_fraction``) or on K images
of every category (``--shots``), to measure what pre-training is worth when labels are few.

Both choices depend only on the annotations and ``--fraction_seed``: numpy's
``Generator(PCG64(SeedSequence(seed)))`` draws over the sorted image ids, never the global RNG
state. ``build_dataset`` makes the choice before any ``DistributedSampler`` splits the data, so
every process and any process count train on the same images, and the same seed gives the same
images on any machine (a test pins the sample's ids, so a change of numpy's stream would show).
Evaluation data is never subset.

The rules:

- **fraction** F of N images: the first ``max(1, round(F * N))`` ids of a seeded permutation of
  the sorted ids (Python's ``round``, halves to even). For one seed, a smaller fraction's images
  are among a larger one's (the subsets are nested).
- **shots** K (after TFA, Wang et al. 2020, whose splits DETReg reuses): categories are taken in
  id order; each shuffles, with the one generator, the images holding a non-crowd box of it, and
  takes images from that order until K chosen images hold it (images an earlier category chose
  count). A category with fewer than K images gets all of them. Unlike TFA, which counts K
  *objects* and keeps only those annotations, a chosen image keeps **every** annotation, so no
  annotated object in it is trained as background; a category can therefore end up in more than K
  images, and ``train_subset.json`` says how many.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from detr_ssl.data.coco import CocoDetection
from detr_ssl.utils.errors import ConfigError
from detr_ssl.utils.logging import LOGGER_NAME

SUBSET_FILE = "train_subset.json"
FRACTION_RULE = ("the first max(1, round(F * N)) ids of a permutation of the N sorted image ids drawn by "
                 "numpy Generator(PCG64(SeedSequence(seed))); nested across fractions for one seed")
SHOTS_RULE = ("categories in id order; each shuffles its images (those with a non-crowd box of it) with the one "
              "seeded generator and takes them until K chosen images hold it (earlier choices count); chosen "
              "images keep all their annotations")
SHOWN_IDS = 10  # image ids named in the log line


def _generator(seed: int) -> np.random.Generator:
    """The one random source of a subset: independent of numpy's and torch's global state."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def _candidates(coco: COCO, among: Iterable[int] | None) -> list[int]:
    return sorted(coco.imgs if among is None else among)


def label_fraction_ids(coco: COCO, fraction: float, seed: int, among: Iterable[int] | None = None) -> list[int]:
    """The sorted ids of ``max(1, round(fraction * N))`` of the N images (``among``: the ids to draw
    from, default all of ``coco``): a prefix of one seeded permutation, so smaller fractions nest."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids = _candidates(coco, among)
    if not ids:
        raise ValueError("no images to choose from")
    count = max(1, round(fraction * len(ids)))
    return sorted(ids[i] for i in _generator(seed).permutation(len(ids))[:count])


def _trained(ann: dict[str, Any]) -> bool:
    """Whether an annotation becomes a training target (``CocoDetection`` drops crowd and empty boxes)."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


def images_by_category(coco: COCO, among: Iterable[int] | None = None) -> dict[int, list[int]]:
    """Category id -> sorted ids of the images with at least one non-crowd, non-empty box of it."""
    allowed = set(_candidates(coco, among))
    images: dict[int, set[int]] = {cat_id: set() for cat_id in coco.cats}
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] in allowed and _trained(ann):
            images.setdefault(ann["category_id"], set()).add(ann["image_id"])
    return {cat_id: sorted(ids) for cat_id, ids in sorted(images.items())}


def few_shot_ids(coco: COCO, shots: int, seed: int, among: Iterable[int] | None = None) -> list[int]:
    """The sorted ids of images that give every category ``shots`` images holding it, where it has
    that many (the TFA-style rule of the module docstring; chosen images keep all annotations)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = _generator(seed)
    chosen: set[int] = set()
    for images in images_by_category(coco, among).values():
        order = rng.permutation(len(images))  # drawn for every category: its order depends only on the seed
        have = sum(image_id in chosen for image_id in images)
        for image_id in (images[i] for i in order):
            if have >= shots:
                break
            if image_id not in chosen:
                chosen.add(image_id)
                have += 1
    return sorted(chosen)


class LabelSubset(Subset):
    """The training images a label budget kept, with ``record``: how they were chosen (the content
    of ``train_subset.json``)."""

    def __init__(self, dataset: CocoDetection, image_ids: list[int], record: dict[str, Any]) -> None:
        position = {image_id: index for index, image_id in enumerate(dataset.ids)}
        super().__init__(dataset, [position[image_id] for image_id in image_ids])
        self.record = record


def describe_subset(coco: COCO, image_ids: list[int], among: list[int], rule: str, fraction: float | None,
                    shots: int | None, seed: int, source: str) -> dict[str, Any]:
    """What ``train_subset.json`` holds: the rule and its values, the ids, and per category the
    chosen images and objects next to the images available."""
    available = images_by_category(coco, among)
    chosen = images_by_category(coco, image_ids)
    kept = set(image_ids)
    objects = {cat_id: 0 for cat_id in available}
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] in kept and _trained(ann):
            objects[ann["category_id"]] = objects.get(ann["category_id"], 0) + 1
    categories = {str(cat_id): {"name": coco.cats.get(cat_id, {}).get("name", "?"), "images": len(chosen[cat_id]),
                                "objects": objects[cat_id], "available_images": len(images)}
                  for cat_id, images in available.items()}
    return {"rule": rule, "description": FRACTION_RULE if rule == "train_fraction" else SHOTS_RULE,
            "train_fraction": fraction, "shots": shots, "fraction_seed": seed, "annotations": source,
            "images_available": len(among), "images": len(image_ids), "image_ids": image_ids,
            "categories": categories}


def apply_label_budget(dataset: Dataset, args: argparse.Namespace) -> Dataset:
    """The training set ``--train_fraction`` / ``--shots`` (seeded by ``--fraction_seed``) keep: a
    ``LabelSubset``, or ``dataset`` itself when neither is set."""
    fraction, shots = getattr(args, "train_fraction", 1.0), getattr(args, "shots", None)
    seed = getattr(args, "fraction_seed", 0)
    if fraction == 1 and shots is None:
        return dataset
    if not isinstance(dataset, CocoDetection):
        raise ConfigError("--train_fraction and --shots choose among labelled training images: --dataset_file "
                          "folder has no labels (pre-training uses every image)")
    if shots is not None and fraction != 1:
        raise ConfigError(f"--shots {shots} and --train_fraction {fraction}: give one label budget")
    among = list(dataset.ids)
    if shots is None:
        rule, ids = "train_fraction", label_fraction_ids(dataset.coco, fraction, seed, among)
    else:
        rule, ids = "shots", few_shot_ids(dataset.coco, shots, seed, among)
    if not ids:
        raise ConfigError(f"--shots {shots}: {dataset.ann_file} has no non-crowd box in its training images")
    record = describe_subset(dataset.coco, ids, among, rule, None if shots else fraction, shots, seed,
                             str(dataset.ann_file))
    _log_subset(record)
    return LabelSubset(dataset, ids, record)


def _log_subset(record: dict[str, Any]) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    ids = record["image_ids"]
    shown = ", ".join(map(str, ids[:SHOWN_IDS])) + (", ..." if len(ids) > SHOWN_IDS else "")
    value = record["train_fraction"] if record["rule"] == "train_fraction" else record["shots"]
    logger.info("--%s %s (--fraction_seed %d): training on %d of %d labelled images (ids %s)", record["rule"], value,
                record["fraction_seed"], len(ids), record["images_available"], shown)
    if record["rule"] == "shots":
        short = [f"{c['name']} ({c['available_images']})" for c in record["categories"].values()
                 if 0 < c["available_images"] < record["shots"]]
        if short:
            logger.warning("--shots %d: %d categories have fewer images, all of which are used: %s", record["shots"],
                           len(short), ", ".join(short[:SHOWN_IDS]) + (", ..." if len(short) > SHOWN_IDS else ""))


def find_label_subset(dataset: Dataset | None) -> LabelSubset | None:
    """The ``LabelSubset`` under a dataset's wrappers (``TwoViews``...), if a label budget made one."""
    while dataset is not None and not isinstance(dataset, LabelSubset):
        dataset = getattr(dataset, "dataset", None)
    return dataset


def write_subset_file(dataset: Dataset | None, output_dir: Path) -> Path | None:
    """Write ``OUTPUT_DIR/train_subset.json`` when the training set is a label budget's subset."""
    subset = find_label_subset(dataset)
    if subset is None:
        return None
    path = Path(output_dir) / SUBSET_FILE
    path.write_text(json.dumps(subset.record, indent=1) + "\n")
    return path
