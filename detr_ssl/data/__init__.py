"""Datasets, transforms and batching: ``build_dataset(image_set, args)`` is the entry point."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset, Subset

from detr_ssl.data.coco import CocoDetection, split_paths
from detr_ssl.data.folder import ImageFolder
from detr_ssl.data.isaid import IsaidDetection
from detr_ssl.data.proposals import Proposals, load_proposals
from detr_ssl.data.subsets import apply_label_budget
from detr_ssl.data.transforms import build_transforms, untransformed
from detr_ssl.data.views import TwoViews, build_view_transforms, collate_views
from detr_ssl.utils.errors import ConfigError
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

__all__ = ["base_dataset", "is_unlabelled", "build_dataset", "collate_fn", "collate_for", "collate_views",
           "num_classes_of", "category_names_of", "get_coco_api", "build_transforms", "build_view_transforms",
           "load_proposals", "CocoDetection", "IsaidDetection", "ImageFolder", "Proposals", "TwoViews",
           "DETECTION_DATASETS"]

# --dataset_file -> the class reading a COCO-json split (layout: see split_paths); 'folder' is unlabelled.
DETECTION_DATASETS: dict[str, type[CocoDetection]] = {"coco": CocoDetection, "isaid": IsaidDetection}


def build_dataset(image_set: str, args: argparse.Namespace, views: int = 1,
                  transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None) -> Dataset:
    """The 'train' or 'val' dataset of ``args.data_path``; split names come from ``--train_split/--val_split``,
    and a pre-training run's ``--val_path`` replaces the 'val' one. ``--proposals`` gives a folder's
    images pseudo-boxes (``--val_proposals`` those of ``--val_path``). ``--train_fraction`` or ``--shots``
    keep a seeded subset of the 'train' images (``detr_ssl.data.subsets``; 'val' stays whole). ``views=2``
    makes it a ``TwoViews`` set, two augmented views of each image (batch it with ``collate_for(2)``).
    ``transforms`` replaces the detection pipeline (a pre-training method's own, e.g. MAE's crops)."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views!r}")
    if args.data_path is None:
        raise ConfigError("no dataset given: pass --data_path ROOT (see data/README.md, section 'Data layouts'); "
                          "the demo runs with no flags at all, or as --config configs/demo.yaml with yours")
    if views == 2:
        transforms = untransformed
    elif transforms is None:
        transforms = build_transforms(image_set, args.min_size, args.max_size, args.augment)
    dataset = _dataset(image_set, args, transforms)
    if image_set == "train":  # chosen here, before any DistributedSampler splits it: the same on every process
        dataset = apply_label_budget(dataset, args)
    return TwoViews(dataset, build_view_transforms(args.min_size, args.max_size)) if views == 2 else dataset


def _dataset(image_set: str, args: argparse.Namespace,
             transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]) -> Dataset:
    proposals_path = getattr(args, "proposals", None)
    if proposals_path and args.dataset_file != "folder":
        raise ConfigError(f"--proposals gives pseudo-boxes to unlabelled images: use it with --dataset_file folder, "
                          f"not {args.dataset_file!r} (labelled data has its own boxes)")
    if image_set == "val" and getattr(args, "val_path", None):  # held-out images of a pre-training run
        proposals = _proposals(getattr(args, "val_proposals", None), args.val_path, args)
        return ImageFolder(args.val_path, transforms, skip_bad=args.skip_bad_samples, proposals=proposals)
    if args.dataset_file == "folder":
        proposals = _proposals(proposals_path, args.data_path, args)
        return ImageFolder(args.data_path, transforms, skip_bad=args.skip_bad_samples, proposals=proposals)
    if args.dataset_file not in DETECTION_DATASETS:
        known = ", ".join([*DETECTION_DATASETS, "folder"])
        raise ConfigError(f"unknown --dataset_file {args.dataset_file!r}; known: {known}")
    split = args.train_split if image_set == "train" else args.val_split
    img_folder, ann_file = split_paths(args.data_path, split)
    return DETECTION_DATASETS[args.dataset_file](img_folder, ann_file, transforms,
                                                 filter_empty=args.filter_empty and image_set == "train",
                                                 skip_bad=args.skip_bad_samples)


def _proposals(path: str | None, images_root: str, args: argparse.Namespace) -> Proposals | None:
    """The pseudo-boxes of ``images_root`` in ``path`` (``--proposals``, ``--val_proposals``), cut to
    ``--proposal_top_k``; None without a file."""
    return load_proposals(path, images_root, getattr(args, "proposal_top_k", None)) if path else None


def collate_fn(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[NestedTensor, list[dict[str, Any]]]:
    """Pad the images of a batch into one NestedTensor; keep the targets as a list."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), list(targets)


def collate_for(views: int) -> Callable[[list], tuple[NestedTensor, list[dict[str, Any]]]]:
    """The collate function of a dataset of ``build_dataset(..., views=views)``: ``collate_views``
    for 2, ``collate_fn`` for 1."""
    return collate_views if views == 2 else collate_fn


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under ``Subset`` and ``TwoViews`` wrappers: what holds the files and records."""
    while isinstance(dataset, (Subset, TwoViews)):
        dataset = dataset.dataset
    return dataset


def is_unlabelled(dataset: Dataset) -> bool:
    """Whether a dataset is a folder of images without labels (under any wrapper)."""
    return isinstance(base_dataset(dataset), ImageFolder)


def get_coco_api(dataset: Dataset) -> COCO:
    """The ground-truth COCO object of a dataset (through ``Subset`` and ``TwoViews`` wrappers), for COCOeval."""
    base = base_dataset(dataset)
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
    return base_dataset(dataset).num_classes
