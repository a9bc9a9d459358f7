"""Unsupervised pseudo-boxes ("proposals") for every image under a folder, for DETReg / AlignDet
pre-training (``main.py --dataset_file folder --data_path DIR --proposals OUT``).

    python scripts/propose_boxes.py --images /data/unlabelled --out /data/proposals.json [--workers 8]

The defaults are DETReg's rule (``detr_ssl/data/proposals.py`` says what it is and which file of
DETReg it comes from): OpenCV's selective search ('fast') on a 128 x 128 copy of each image, the
first 30 boxes of its ranking, no size filter. ``--method random`` draws random boxes instead (a
baseline; it needs no OpenCV). Selective search needs ``pip install opencv-contrib-python-headless``.

The output is COCO-style json: ``images`` (``id`` = the index in sorted order, as ``--dataset_file
folder`` numbers them; ``file_name`` = the path relative to ``--images``), one category "object",
and per box ``bbox`` [x, y, w, h] in pixels, ``rank`` (0 is best) and ``score`` (decreasing with the
rank); ``info`` holds the arguments. The same arguments give the same file for any ``--workers``.

An interrupted run resumes: each finished image is appended to ``OUT.partial.jsonl`` at once, and
a rerun with the same arguments computes only the other images, then writes ``OUT`` (atomically)
and removes the partial file. A rerun with other arguments is refused. Unreadable images are left
out of ``OUT`` and listed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from detr_ssl.data.convert import require_paths
from detr_ssl.data.proposals import (METHODS, ProposalSettings, init_worker, propose, proposals_json,
                                     require_selective_search)
from detr_ssl.utils.errors import ConfigError, UserError
from detr_ssl.utils.image import image_files

DEFAULTS = ProposalSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="proposals json to write")
    parser.add_argument("--method", choices=METHODS, default=DEFAULTS.method,
                        help="'selective_search': OpenCV's, 'fast' mode, as DETReg (default); 'random': uniform "
                             "random boxes, seeded per image (a baseline without OpenCV)")
    parser.add_argument("--top_k", type=int, default=DEFAULTS.top_k,
                        help="boxes kept per image, best first (default: %(default)s, DETReg's max_prop); 0 keeps "
                             "every selective-search box, to cut later with --proposal_top_k")
    parser.add_argument("--min_size", type=float, default=DEFAULTS.min_size,
                        help="drop boxes narrower or lower than this, in original pixels, before taking the top k "
                             "(default: %(default)s, no filter, as DETReg); random boxes have sides at least this")
    parser.add_argument("--resize", type=int, default=DEFAULTS.resize,
                        help="run selective search on a RESIZE x RESIZE copy of the image (aspect not kept) and "
                             "scale the boxes back (default: %(default)s, DETReg's training); 0: the full image "
                             "(DETReg's box cache; slower)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of the random boxes and of selective search's ranking, drawn per image from "
                             "(seed, image id) (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes computing images in parallel (default: min(CPU count, 8) = %(default)s)")
    return parser


def settings_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ProposalSettings:
    """The settings the flags ask for, refusing values that cannot work."""
    if args.top_k < 0 or args.min_size < 0 or args.resize < 0:
        parser.error("--top_k, --min_size and --resize must be >= 0")
    if args.method == "random" and args.top_k == 0:
        parser.error("--method random draws --top_k boxes per image: give --top_k >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return ProposalSettings(args.method, args.top_k, args.min_size, args.resize, args.seed)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def flags_of(settings: dict[str, Any]) -> str:
    return " ".join(f"--{key} {value}" for key, value in settings.items())


def read_partial(path: Path, settings: ProposalSettings, file_names: list[str]) -> dict[int, dict[str, Any]]:
    """The records an interrupted run left in ``path`` (none if there is no such file). A last line
    cut off mid-write is removed; other arguments or another folder than this run's are refused."""
    if not path.is_file():
        return {}
    entries, good_bytes = [], 0
    with path.open("r+b") as handle:
        for line in handle:
            if not line.endswith(b"\n"):  # unfinished
                break
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
            good_bytes += len(line)
        handle.truncate(good_bytes)
    if not entries:
        return {}
    started = entries[0].get("settings")
    if started != settings.as_dict():
        raise ConfigError(f"{path} holds an interrupted run with {flags_of(started or {})}, but this run asks for "
                          f"{flags_of(settings.as_dict())}: rerun with its arguments to resume it, or delete the file "
                          "to start over")
    done = {}
    for record in entries[1:]:
        index = record["index"]
        if index >= len(file_names) or file_names[index] != record["file_name"]:
            raise ConfigError(f"{path}: image {index} was {record['file_name']!r}, but the folder has changed since "
                              "(images added or removed): delete the file to start over")
        done[index] = record
    return done


def compute(tasks: list[tuple[int, str, str]], settings: ProposalSettings, workers: int) -> Iterator[dict[str, Any]]:
    """The records of ``tasks``, in the order they finish."""
    work = partial(propose, settings=settings)
    if workers == 1:
        init_worker(settings.method)
        yield from map(work, tasks)
        return
    with Pool(workers, initializer=init_worker, initargs=(settings.method,)) as pool:
        yield from pool.imap_unordered(work, tasks, chunksize=4)


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        json.dump(data, handle)
        handle.write("\n")
    os.replace(temporary, path)


def run(args: argparse.Namespace, settings: ProposalSettings) -> dict[str, Any]:
    """Compute what the partial file lacks, then write ``--out``; returns its json."""
    if settings.method == "selective_search":
        require_selective_search()  # fail here, not in every worker
    files = image_files(args.images)
    if not files:
        raise ConfigError(f"--images {args.images}: no image files below it")
    names = [file.relative_to(args.images).as_posix() for file in files]
    sidecar = partial_path(args.out)
    done = read_partial(sidecar, settings, names)
    todo = [(index, str(file), names[index]) for index, file in enumerate(files) if index not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with sidecar.open("a") as sink:
        if sink.tell() == 0:
            sink.write(json.dumps({"settings": settings.as_dict()}) + "\n")
        progress = tqdm(compute(todo, settings, args.workers), total=len(files), initial=len(done),
                        desc="proposals", unit="image", dynamic_ncols=True)
        for record in progress:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[record["index"]] = record
    coco = proposals_json(settings, list(done.values()))
    write_atomically(args.out, coco)
    sidecar.unlink()
    unreadable = [record["error"] for record in done.values() if "error" in record]
    if unreadable:
        print(f"warning: {len(unreadable)} unreadable image(s) left out of {args.out}:", *unreadable, sep="\n  ",
              file=sys.stderr)
    return coco


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_paths(parser, [args.images])
    settings = settings_from(parser, args)
    try:
        coco = run(args, settings)
    except UserError as err:
        parser.error(str(err))
    print(f"wrote {args.out}: {len(coco['annotations'])} boxes on {len(coco['images'])} images "
          f"({settings.method}, {flags_of(settings.as_dict())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
