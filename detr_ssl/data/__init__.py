"""Datasets, transforms and batching: ``build_dataset(image_set, args)`` is the entry point."""
from __future__ import annotations

import argparse
from typing import Any

from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset, Subset

from detr_ssl.data.coco import CocoDetection, split_paths
from detr_ssl.data.folder import ImageFolder
from detr_ssl.data.transforms import build_transforms
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

__all__ = ["build_dataset", "collate_fn", "num_classes_of", "get_coco_api", "build_transforms", "CocoDetection", "ImageFolder"]


def build_dataset(image_set: str, args: argparse.Namespace) -> Dataset:
    """The 'train' or 'val' dataset of ``args.data_path``; split names come from ``--train_split/--val_split``."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if args.data_path is None:
        raise ValueError("no dataset given: pass --data_path ROOT (see data/README.md, section 'Data layouts')")
    if args.dataset_file == "folder":
        return ImageFolder(args.data_path, build_transforms(image_set, args.min_size, args.max_size, args.augment))
    if args.dataset_file != "coco":
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; known: coco, folder")
    split = args.train_split if image_set == "train" else args.val_split
    img_folder, ann_file = split_paths(args.data_path, split)
    transforms = build_transforms(image_set, args.min_size, args.max_size, args.augment)
    return CocoDetection(img_folder, ann_file, transforms, filter_empty=args.filter_empty and image_set == "train")


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


def num_classes_of(dataset: Dataset) -> int:
    """Classifier size: largest category id + 1, as the official DETR code (COCO: 91)."""
    coco = get_coco_api(dataset)
    if not coco.cats:
        raise ValueError(f"{_unwrap(dataset).ann_file}: no categories listed")
    return max(coco.cats) + 1
