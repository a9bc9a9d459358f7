"""Datasets, transforms and batching: ``build_dataset(image_set, args)`` is the entry point."""
from __future__ import annotations

import argparse
from typing import Any

from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset, Subset

from detr_ssl.data.coco import CocoDetection, split_paths
from detr_ssl.data.folder import ImageFolder
from detr_ssl.data.isaid import IsaidDetection
from detr_ssl.data.transforms import build_transforms
from detr_ssl.utils.errors import ConfigError
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

__all__ = ["build_dataset", "collate_fn", "num_classes_of", "category_names_of", "get_coco_api", "build_transforms",
           "CocoDetection", "IsaidDetection", "ImageFolder", "DETECTION_DATASETS"]

# --dataset_file -> the class reading a COCO-json split (layout: see split_paths); 'folder' is unlabelled.
DETECTION_DATASETS: dict[str, type[CocoDetection]] = {"coco": CocoDetection, "isaid": IsaidDetection}


def build_dataset(image_set: str, args: argparse.Namespace) -> Dataset:
    """The 'train' or 'val' dataset of ``args.data_path``; split names come from ``--train_split/--val_split``,
    and a pre-training run's ``--val_path`` replaces the 'val' one."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if args.data_path is None:
        raise ConfigError("no dataset given: pass --data_path ROOT (see data/README.md, section 'Data layouts')")
    transforms = build_transforms(image_set, args.min_size, args.max_size, args.augment)
    if image_set == "val" and getattr(args, "val_path", None):  # held-out images of a pre-training run
        return ImageFolder(args.val_path, transforms, skip_bad=args.skip_bad_samples)
    if args.dataset_file == "folder":
        return ImageFolder(args.data_path, transforms, skip_bad=args.skip_bad_samples)
    if args.dataset_file not in DETECTION_DATASETS:
        known = ", ".join([*DETECTION_DATASETS, "folder"])
        raise ConfigError(f"unknown --dataset_file {args.dataset_file!r}; known: {known}")
    split = args.train_split if image_set == "train" else args.val_split
    img_folder, ann_file = split_paths(args.data_path, split)
    return DETECTION_DATASETS[args.dataset_file](img_folder, ann_file, transforms,
                                                 filter_empty=args.filter_empty and image_set == "train",
                                                 skip_bad=args.skip_bad_samples)


def collate_fn(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[NestedTensor, list[dict[str, Any]]]:
    """Pad the images of a batch into one NestedTensor; keep the targets as a list."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), list(targets)


def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api(dataset: Dataset) -> COCO:
    """The ground-truth COCO object of a dataset (through ``Subset`` wrappers), for COCOeval."""
    base = _unwrap(dataset)
    if not isinstance(base, CocoDetection):
        raise TypeError(f"expected a COCO-json dataset, got {type(base).__name__}")
    return base.coco


def category_names_of(dataset: Dataset) -> dict[int, str]:
    """The annotations' category names by id (what a checkpoint keeps so that its classes have names
    after the data has gone)."""
    return {int(cat_id): str(cat["name"]) for cat_id, cat in sorted(get_coco_api(dataset).cats.items())}


def num_classes_of(dataset: Dataset) -> int:
    """Classifier size the data asks for: largest category id + 1, as the official DETR code
    (COCO: 91); fixed by the dataset kind where it has a fixed class list (iSAID: 16)."""
    get_coco_api(dataset)  # refuses datasets without annotations
    return _unwrap(dataset).num_classes
