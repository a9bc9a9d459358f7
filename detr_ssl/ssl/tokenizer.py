"""Visual tokenizers: each normalised p x p patch -> one of K ids, mim_discrete's targets.

A tokenizer file is a plain dict (kind, patch_size, codebook_size, mean, std, state_dict)
written with ``torch.save``; ``load_tokenizer`` reads it with ``weights_only=True`` so that a
file cannot run code, and dispatches on ``kind`` through ``TOKENIZERS``. Ours is a k-means
codebook, fitted on a folder of images by ``fit_kmeans_tokenizer_on_folder`` (the body of
scripts/fit_tokenizer.py); a dVAE, as BEiT's, would be one more class and one more entry.
"""
from __future__ import annotations

import abc

import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from detr_ssl.utils.image import IMAGENET_MEAN, IMAGENET_STD, find_images
from detr_ssl.ssl.patches import patchify

# Images are resized like evaluation images: the longer side is capped at DETR's 1333/800
# times the shorter one.
MAX_SIZE_RATIO = 1333 / 800


class Tokenizer(nn.Module, abc.ABC):
    """Maps (N, p*p*3) patches, normalised with ``mean``/``std``, to (N,) ids in [0, codebook_size)."""

    kind: ClassVar[str]

    def __init__(self, patch_size: int, codebook_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.patch_size = patch_size
        self.codebook_size = codebook_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @abc.abstractmethod
    def encode(self, patches: Tensor) -> Tensor:
        """(N, p*p*3) normalised patches -> (N,) int64 visual-token ids."""

    @abc.abstractmethod
    def decode(self, ids: Tensor) -> Tensor:
        """(N,) ids -> (N, p*p*3) normalised patches that stand for them."""

    @classmethod
    @abc.abstractmethod
    def from_record(cls, record: dict[str, Any]) -> Tokenizer:
        """The tokenizer that ``save`` wrote as ``record``."""

    def save(self, path: str | Path) -> None:
        record = {"kind": self.kind, "patch_size": self.patch_size, "codebook_size": self.codebook_size,
                  "mean": list(self.mean), "std": list(self.std),
                  "state_dict": {k: v.cpu() for k, v in self.state_dict().items()}}
        torch.save(record, path)


class KMeansTokenizer(Tokenizer):
    """The id of a patch is its nearest centroid (squared Euclidean) in a k-means codebook."""

    kind = "kmeans"

    def __init__(self, centroids: Tensor, patch_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if centroids.ndim != 2 or centroids.shape[1] != patch_size * patch_size * 3:
            raise ValueError(f"centroids must be (K, {patch_size * patch_size * 3}) for {patch_size}x{patch_size} "
                             f"RGB patches, got {tuple(centroids.shape)}")
        super().__init__(patch_size, centroids.shape[0], mean, std)
        self.register_buffer("centroids", centroids.float())

    def encode(self, patches: Tensor) -> Tensor:
        return nearest(patches, self.centroids)[0]

    def decode(self, ids: Tensor) -> Tensor:
        return self.centroids[ids]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> KMeansTokenizer:
        tokenizer = cls(record["state_dict"]["centroids"], record["patch_size"], record["mean"], record["std"])
        if tokenizer.codebook_size != record["codebook_size"]:
            raise ValueError(f"the file says codebook_size {record['codebook_size']} but holds "
                             f"{tokenizer.codebook_size} centroids")
        return tokenizer

    @classmethod
    def fit(cls, patches: Tensor, codebook_size: int, patch_size: int, iters: int = 20, seed: int = 0,
            batch_size: int = 65536, progress: bool = False) -> tuple[KMeansTokenizer, float]:
        """k-means++ then ``iters`` Lloyd steps on (N, p*p*3) ImageNet-normalised patches.

        Returns the tokenizer and its inertia (sum of squared distances to the nearest centroid).
        The same seed, data and device give the same codebook.
        """
        centroids, inertia = kmeans(patches, codebook_size, iters, seed, batch_size, progress)
        return cls(centroids, patch_size), inertia


TOKENIZERS: dict[str, type[Tokenizer]] = {KMeansTokenizer.kind: KMeansTokenizer}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a file written by ``Tokenizer.save``; refuse files that would need to run code."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} is not a plain tokenizer file: loading it would run code, refused "
                         f"(torch.load weights_only=True says: {str(error).splitlines()[0]})") from error
    if not isinstance(record, dict) or "kind" not in record:
        raise ValueError(f"{path} is not a tokenizer file (no 'kind'); write one with scripts/fit_tokenizer.py")
    if record["kind"] not in TOKENIZERS:
        raise ValueError(f"{path} holds a tokenizer of unknown kind {record['kind']!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[record["kind"]].from_record(record)


def nearest(points: Tensor, centroids: Tensor, chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """(N,) index of each point's nearest centroid and (N,) squared distance to it.

    Works through the points in chunks so that the distance matrix stays near
    ``chunk_elements`` entries whatever N and K.
    """
    rows = max(1, chunk_elements // len(centroids))
    centroid_norms = centroids.square().sum(1)
    ids, distances = [], []
    for chunk in points.split(rows):
        d2 = chunk.square().sum(1, keepdim=True) - 2 * chunk @ centroids.T + centroid_norms
        best, index = d2.min(1)
        ids.append(index)
        distances.append(best.clamp(min=0))
    return torch.cat(ids), torch.cat(distances)


def kmeans_plusplus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centroid is a point drawn with probability proportional to
    its squared distance to the nearest centroid so far; a spread-out start for Lloyd."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator, device=generator.device))]
    closest = nearest(points, points[chosen])[1]
    for _ in range(1, k):
        # all points already coincide with a centroid (fewer distinct points than k): draw uniformly
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, nearest(points, points[index : index + 1])[1])
    return points[chosen].clone()


def kmeans(points: Tensor, k: int, iters: int, seed: int = 0, batch_size: int = 65536,
           progress: bool = False) -> tuple[Tensor, float]:
    """(k, D) centroids after k-means++ and ``iters`` Lloyd steps, and their inertia.

    Each Lloyd step assigns the points batch by batch and moves every centroid to the mean of
    its points; a centroid that gets no points stays where it is.
    """
    if not 1 <= k <= len(points):
        raise ValueError(f"codebook size must be in [1, number of patches = {len(points)}], got {k}")
    points = points.float()
    generator = torch.Generator(device=points.device).manual_seed(seed)
    centroids = kmeans_plusplus(points, k, generator)
    steps = tqdm(range(iters), desc="k-means", unit="iter", disable=not progress)
    for _ in steps:
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, device=points.device)
        inertia = 0.0
        for batch in points.split(batch_size):
            ids, distances = nearest(batch, centroids)
            sums.index_add_(0, ids, batch)
            counts += torch.bincount(ids, minlength=k)
            inertia += float(distances.sum())
        steps.set_postfix(inertia=f"{inertia:.4g}")
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    inertia = sum(float(nearest(batch, centroids)[1].sum()) for batch in points.split(batch_size))
    return centroids, inertia


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``image_size`` and the longer one at most
    ``MAX_SIZE_RATIO * image_size``; computed here so that counting and loading patches agree."""
    scale = min(image_size / min(width, height), MAX_SIZE_RATIO * image_size / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def image_patches(path: Path, size: tuple[int, int], patch_size: int) -> Tensor:
    """(n, p*p*3) ImageNet-normalised patches of every full p x p cell of the image resized to ``size``."""
    with Image.open(path) as image:
        pixels = TF.pil_to_tensor(image.convert("RGB"))
    pixels = TF.to_dtype(TF.resize(pixels, list(size), antialias=True), torch.float32, scale=True)
    pixels = TF.normalize(pixels, list(IMAGENET_MEAN), list(IMAGENET_STD))
    height, width = (side // patch_size * patch_size for side in size)
    return patchify(pixels[None, :, :height, :width], patch_size).flatten(0, 2)


def folder_patches(paths: list[Path], patch_size: int, image_size: int, max_patches: int,
                   seed: int = 0, progress: bool = False) -> Tensor:
    """A seeded uniform subset of at most ``max_patches`` of all the images' full patches.

    Sizes come from the image headers first, so the subset is drawn once over all patches and
    only the chosen ones are ever held in memory.
    """
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(resized_size(*image.size, image_size))
    counts = [(h // patch_size) * (w // patch_size) for h, w in sizes]
    if sum(counts) == 0:
        raise ValueError(f"no image holds a full {patch_size}x{patch_size} patch at image size {image_size}")
    keep = torch.zeros(sum(counts), dtype=torch.bool)
    keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:max_patches]] = True
    chosen = []
    images = tqdm(paths, desc="patches", unit="image", disable=not progress)
    for path, size, image_keep in zip(images, sizes, keep.split(counts)):
        if image_keep.any():
            chosen.append(image_patches(path, size, patch_size)[image_keep])
    return torch.cat(chosen)


def fit_kmeans_tokenizer_on_folder(folder: str | Path, out: str | Path, codebook_size: int, patch_size: int = 32,
                                   iters: int = 20, image_size: int = 512, max_patches: int = 100_000,
                                   seed: int = 0, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Fit a ``KMeansTokenizer`` on the patches of every image below ``folder``, save it to
    ``out`` and return a summary (images, patches, inertia, time)."""
    start = time.perf_counter()
    paths = find_images(folder)
    patches = folder_patches(paths, patch_size, image_size, max_patches, seed, progress).to(device)
    tokenizer, inertia = KMeansTokenizer.fit(patches, codebook_size, patch_size, iters=iters, seed=seed,
                                             progress=progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    return {"out": str(out), "images": len(paths), "patches": len(patches), "codebook_size": codebook_size,
            "patch_size": patch_size, "iters": iters, "inertia": inertia,
            "mean_squared_error": inertia / patches.numel(), "time_s": round(time.perf_counter() - start, 2)}
