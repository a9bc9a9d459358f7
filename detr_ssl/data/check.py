"""The up-front data check (``--check_data``, ``scripts/check_data.py``): every problem at once.

Without it a missing or truncated image stops a run when the loader reaches it, perhaps hours
into an epoch, and only the first one is named. The check opens every image file before training:
``quick`` reads the header only (format and size, ~0.1 ms a JPEG) and compares the size with the
json; ``full`` also decodes the pixels, which is what finds a truncated file (its header still
opens). Bad records are found by ``validate_annotations``, the datasets' own validation, so the
check and ``--skip_bad_samples`` agree on what is bad; the datasets keep doing the skipping.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path

from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from tqdm import tqdm

from detr_ssl.data import DETECTION_DATASETS, base_dataset
from detr_ssl.data.coco import AnnotationScan, CocoDetection, _listing, split_paths, validate_annotations
from detr_ssl.data.folder import ImageFolder
from detr_ssl.utils import dist
from detr_ssl.utils.errors import DataError

CHECK_LEVELS = ("quick", "full")  # --check_data none skips the check
DECODE_WORKERS = 4  # decoding releases the GIL, so threads help; header reads are faster without them (measured)

MISSING = "image file(s) not found"
UNREADABLE = "image file(s) that do not open as an image"
UNDECODABLE = "image file(s) that do not decode (truncated or corrupt)"
WRONG_SIZE = "image(s) whose pixel size differs from the json's width and height"
EMPTY_BOX = "annotation(s) with a zero or negative width or height (dropped, as always)"
CLIPPED = "annotation(s) whose box extends beyond its image (clipped to it)"

ImageJob = tuple[Path, str, tuple[int, int] | None]  # file, how to name it, the (width, height) the json says


@dataclass
class DataReport:
    """What the check of one dataset found: counts for its summary, problems (which stop a run) and
    notes (what training drops or clips anyway), each by kind in the order found."""

    where: str
    labelled: bool = True
    images: int = 0
    objects: int = 0
    categories: int = 0
    empty_images: int = 0
    bad_records: int = 0
    record_lines: list[str] = field(default_factory=list)  # validate_annotations' lines, one per kind
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_problems(self) -> int:
        return self.bad_records + sum(map(len, self.problems.values()))

    @property
    def clipped(self) -> int:
        return len(self.notes.get(CLIPPED, ()))

    def merged(self, other: DataReport) -> DataReport:
        """This report and that of another shard of the same dataset as one."""
        def join(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
            return {kind: a.get(kind, []) + b.get(kind, []) for kind in {**a, **b}}

        return DataReport(self.where, self.labelled, self.images + other.images, self.objects + other.objects,
                          max(self.categories, other.categories), self.empty_images + other.empty_images,
                          self.bad_records + other.bad_records, self.record_lines + other.record_lines,
                          join(self.problems, other.problems), join(self.notes, other.notes))

    def summary(self) -> str:
        if not self.labelled:
            return f"{self.where}: {self.images} images (unlabelled)"
        return (f"{self.where}: {self.images} images, {self.objects} objects, {self.categories} categories, "
                f"{self.clipped} boxes clipped to the image, {self.empty_images} empty images")

    def kinds(self) -> list[str]:
        """Each kind of problem with its count, for a one-line summary."""
        records = [f"{self.bad_records} bad json record(s)"] if self.bad_records else []
        return records + [f"{len(items)} {kind}" for kind, items in self.problems.items()]

    def problem_lines(self) -> list[str]:
        return self.record_lines + _lines(self.where, self.problems)

    def note_lines(self) -> list[str]:
        return _lines(self.where, self.notes)


def _lines(where: str, kinds: dict[str, list[str]]) -> list[str]:
    return [f"{where}: {len(items)} {kind}: {_listing(items)}" for kind, items in kinds.items() if items]


def problem_message(reports: Iterable[DataReport], level: str, hint: str) -> str | None:
    """None when ``reports`` hold no problem; else one summary line (counts by kind, then ``hint``),
    and below it one line per kind naming the first files and records."""
    bad = [report for report in reports if report.num_problems]
    if not bad:
        return None
    total = sum(report.num_problems for report in bad)
    kinds = "; ".join(f"{report.where}: {', '.join(report.kinds())}" for report in bad)
    details = [f"  {line}" for report in bad for line in report.problem_lines()]
    return "\n".join([f"data check ({level}) found {total} problem(s): {kinds}; {hint}", *details])


def check_dataset(dataset: Dataset, level: str = "quick", shard: tuple[int, int] = (0, 1),
                  progress: bool = True) -> DataReport:
    """Check a ``CocoDetection`` (records and image files) or an ``ImageFolder`` (image files).

    With ``shard=(k, n)`` only every n-th image from the k-th is opened, and only shard 0 counts
    the records, so that the reports of the n shards merge into that of the whole dataset.
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"level must be one of {CHECK_LEVELS}, got {level!r}")
    dataset = base_dataset(dataset)
    if isinstance(dataset, CocoDetection):
        report = DataReport(str(dataset.ann_file))
        scan, record_lines = _scan(dataset.coco, dataset.ann_file)  # every shard needs the scan, one the counts
        if shard[0] == 0:
            report.record_lines = record_lines
            _count_records(dataset.coco, scan, report)
        jobs = [_coco_job(Path(dataset.root), image_id, info, scan)
                for image_id, info in sorted(dataset.coco.imgs.items())]
    elif isinstance(dataset, ImageFolder):
        report = DataReport(str(dataset.root), labelled=False, images=len(dataset.files) if shard[0] == 0 else 0)
        jobs = [(path, str(path), None) for path in dataset.files]
    else:
        raise TypeError(f"cannot check a {type(dataset).__name__}: expected a CocoDetection or an ImageFolder")
    jobs = jobs[shard[0]::shard[1]]
    results = _open_all(jobs, decode=level == "full")
    for (_, name, _), problem in zip(jobs, tqdm(results, total=len(jobs), desc=f"data check ({level})",
                                                unit="image", disable=not progress, dynamic_ncols=True,
                                                leave=False)):
        if problem is not None:
            kind, detail = problem
            report.problems.setdefault(kind, []).append(f"{name}: {detail}" if detail else name)
    return report


def _scan(coco: COCO, ann_file: Path) -> tuple[AnnotationScan, list[str]]:
    """``validate_annotations``' scan, and its lines naming the bad records by kind (none if all are good)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about empty boxes becomes a note of the report
        try:
            return validate_annotations(coco, ann_file), []
        except DataError as err:  # the first line says what to do; the others list the records
            return validate_annotations(coco, ann_file, skip_bad=True), str(err).splitlines()[1:]


def _count_records(coco: COCO, scan: AnnotationScan, report: DataReport) -> None:
    """Fill the summary counts of ``report`` and its notes on empty and clipped boxes."""
    images = {image_id: info for image_id, info in coco.imgs.items() if image_id not in scan.bad_images}
    objects: Counter[int] = Counter()
    for ann in coco.dataset.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None or ann["id"] in scan.bad_annotations:
            continue
        name = f"annotation {ann['id']} (image {ann['image_id']} '{image.get('file_name')}', bbox {ann['bbox']})"
        x, y, w, h = ann["bbox"]
        if ann["id"] in scan.empty:
            report.notes.setdefault(EMPTY_BOX, []).append(name)
        elif not ann.get("iscrowd", 0):
            objects[ann["image_id"]] += 1
            if x < 0 or y < 0 or x + w > image["width"] or y + h > image["height"]:
                report.notes.setdefault(CLIPPED, []).append(f"{name} in {image['width']}x{image['height']} px")
    report.images, report.categories = len(coco.imgs), len(coco.cats)
    report.objects = sum(objects.values())
    report.empty_images = sum(1 for image_id in images if not objects[image_id])
    report.bad_records = len(scan.bad_images) + len(scan.bad_annotations)


def _coco_job(root: Path, image_id: int, info: dict, scan: AnnotationScan) -> ImageJob:
    path = root / str(info.get("file_name"))
    size = None if image_id in scan.bad_images else (info["width"], info["height"])  # no usable size to compare
    return path, f"{path} (image id {image_id})", size


def _open_all(jobs: list[ImageJob], decode: bool) -> Iterator[tuple[str, str] | None]:
    """What is wrong with each job's file (None: nothing), in order."""
    check = partial(_open_image, decode=decode)
    if not decode:
        yield from map(check, jobs)
        return
    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        yield from pool.map(check, jobs)


def _open_image(job: ImageJob, decode: bool) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with the job's image file, or None."""
    path, _, size = job
    found = None
    try:
        with Image.open(path) as image:
            found = image.size
            if decode:
                image.load()
    except FileNotFoundError:
        return MISSING, ""
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError...: all mean unusable
        return (UNREADABLE if found is None else UNDECODABLE), f"{type(err).__name__}: {err}"
    if size is not None and found != tuple(size):
        return WRONG_SIZE, f"is {found[0]}x{found[1]} px, the json says {size[0]}x{size[1]}"
    return None


def check_datasets(datasets: Iterable[Dataset], level: str, skip_bad: bool, logger: logging.Logger) -> list[DataReport]:
    """The check before training (``--check_data``): log a summary of each dataset, then stop with a
    DataError naming every problem, or with ``skip_bad`` log them (the datasets skip those images
    when they load them, as always). ``level`` 'none' checks nothing.

    Under torchrun every process opens its share of the images (every world_size-th) and the reports
    are gathered, so all processes stop together, with the same message.
    """
    if level == "none":
        return []
    start, reports, seen = time.perf_counter(), [], set()
    for dataset in datasets:
        key = getattr(dataset, "ann_file", None) or getattr(dataset, "root", None)
        if key in seen:  # --val_split train: the same files again
            continue
        seen.add(key)
        shard = (dist.get_rank(), dist.get_world_size())
        report = check_dataset(dataset, level, shard, progress=dist.is_main_process())
        reports.append(reduce(DataReport.merged, dist.all_gather_object(report)))
    for report in reports:
        logger.info("data: %s", report.summary())
        for line in report.note_lines():
            logger.info("data: %s", line)
    logger.info("data check (--check_data %s) took %.2f s", level, time.perf_counter() - start)
    hint = ("--skip_bad_samples skips these images when it loads them, and logs each" if skip_bad else
            "fix them, pass --skip_bad_samples to skip and log them, or --check_data none to start without the check")
    message = problem_message(reports, level, hint)
    if message and skip_bad:
        logger.warning(message)
    elif message:
        raise DataError(message)
    return reports


def dataset_for_check(data_path: str | Path, dataset_file: str, split: str) -> Dataset:
    """``split`` of ``data_path`` as training reads it (whole-file errors raise alike), but with the bad
    records kept rather than refused or skipped, so that the check lists them with the bad images."""
    if dataset_file == "folder":
        return ImageFolder(data_path, transforms=None)
    img_folder, ann_file = split_paths(data_path, split)

    class KeepingBadRecords(DETECTION_DATASETS[dataset_file]):
        def _skip(self, scan: AnnotationScan) -> None:
            """Keep them: the check reports them."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the check notes the empty boxes itself
        return KeepingBadRecords(img_folder, ann_file, transforms=None, skip_bad=True)
