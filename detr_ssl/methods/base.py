"""The interface of a whole-detector pre-training method (UP-DETR, DETReg, box-domain contrastive).

A method is one class. It declares

- its flags (``add_arguments``, ``validate``, ``configure``) and which of them shape the model
  (``architecture_flags``, which ``--eval --resume`` takes from a checkpoint);
- what it needs from the data: ``views`` (2: two augmented views of each image, ordered [all
  first views, all second views] in the batch), ``needs_proposals`` (targets are the
  ``--proposals`` pseudo-boxes) and ``transforms`` (its own pipeline, e.g. MAE's crops);
- the modules it adds to a detector (``attach``; their state-dict prefixes in
  ``module_prefixes``, so that their names are the method's own, e.g. the official UP-DETR ones);
- its training pass (``forward``, through the detector's ``run``: :mod:`detr_ssl.models.passes`);
- its losses (``loss`` on its own outputs, ``matched_losses`` on the detection outputs after
  Hungarian matching) and their weights (``weight_dict``);
- its TensorBoard pictures (``pictures``) and what follows each optimizer step
  (``after_optimizer_step``, e.g. a momentum copy);
- which keys ``--pretrain`` hands on (``pretrain_drops``: everything the method trained except
  the classifier and its own modules, by default).

Detectors and engine call these and know no method by name; the registry is
:data:`detr_ssl.methods.METHODS`.
"""
from __future__ import annotations

import abc
import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from torch import Tensor, nn

if TYPE_CHECKING:
    from ..models.passes import DetectorPass
    from ..utils.misc import NestedTensor

Error = Callable[[str], NoReturn]
MatchedLoss = Callable[[dict, list[dict], list[tuple[Tensor, Tensor]], float], dict[str, Tensor]]
Picture = tuple[str, Tensor, int]  # TensorBoard tag, (N, 3, H, W) images in [0, 1], rows of the grid
Transform = Callable[[Any, dict], tuple[Tensor, dict]]  # (PIL image, target) -> (model input, target)


class DetectorMethod(abc.ABC):
    """A whole-detector pre-training method; subclasses set the class attributes, implement
    ``forward`` and override the other hooks they use."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = ("pretrain",)  # the --ssl_mode values it supports
    views: ClassVar[int] = 1
    needs_proposals: ClassVar[bool] = False
    pretrain_classes: ClassVar[int | None] = None  # classifier size in pre-training (None: the data's)
    module_prefixes: ClassVar[tuple[str, ...]] = ()
    architecture_flags: ClassVar[tuple[str, ...]] = ()
    # What --pretrain does not hand on besides the method's own modules: the pre-training classes are not the data's.
    pretrain_drops: ClassVar[tuple[str, ...]] = ("class_embed.",)

    def __init__(self, args: argparse.Namespace):
        self.args = args

    # --- flags -----------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's flags (one argument group, titled by the method)."""

    @classmethod
    def validate(cls, args: argparse.Namespace, error: Error) -> None:
        """Refuse impossible flag values when the method is active, naming the flag."""

    @classmethod
    def configure(cls, args: argparse.Namespace, given: set[str]) -> None:
        """Fill in the method's defaults of other flags (``given``: flags the user set)."""

    @classmethod
    def transforms(cls, image_set: str, args: argparse.Namespace) -> Transform | None:
        """The 'train' / 'val' pipeline the method trains on instead of detection's (None: detection's)."""
        return None

    @classmethod
    def recognises(cls, state: dict[str, Tensor]) -> bool:
        """Whether a state dict comes from this method's pre-training (it holds the method's modules)."""
        return any(key.startswith(cls.module_prefixes) for key in state) if cls.module_prefixes else False

    # --- model -----------------------------------------------------------------------------------
    def attach(self, detector: nn.Module) -> None:
        """Add the method's modules to ``detector`` and make it the detector's ``ssl_method``."""
        detector.ssl_method = self

    @abc.abstractmethod
    def forward(self, detector: nn.Module, samples: NestedTensor, detect: bool) -> DetectorPass:
        """The training pass (and a pre-training run's validation pass): the detector's ``run``,
        with the method's outputs added to ``outputs``; ``detect`` (multi-task) also decodes the
        object queries for detection."""

    def after_optimizer_step(self, detector: nn.Module) -> None:
        """Called after every optimizer step."""

    # --- losses ----------------------------------------------------------------------------------
    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The method's losses from its own outputs (not the detection outputs)."""
        return {}

    def matched_losses(self) -> dict[str, MatchedLoss]:
        """Losses on the detection outputs that use the matching (name -> function(outputs, targets,
        indices, num_boxes)); the criterion computes them on every decoder layer, and a function
        returns ``{}`` for the layers whose outputs lack what it reads."""
        return {}

    def weight_dict(self, scale: float = 1.0) -> dict[str, float]:
        """The weights of the method's losses, times ``scale`` (the --ssl_loss_schedule factor)."""
        return {}

    def describe(self) -> str:
        """One line for the log: what the method does in this run."""
        return f"{self.name} ({self.args.ssl_mode})"

    # --- pictures --------------------------------------------------------------------------------
    def pictures(self, outputs: dict, targets: list[dict]) -> list[Picture]:
        """TensorBoard pictures of the method's outputs (and the batch's targets)."""
        return []

    # --- fine-tuning -----------------------------------------------------------------------------
    @classmethod
    def pretrained_part(cls, state: dict[str, Any]) -> dict[str, Any]:
        """The tensors of this method's pre-training checkpoint that detection starts from."""
        drops = (*cls.pretrain_drops, *cls.module_prefixes)
        return {key: value for key, value in state.items() if not key.startswith(drops)}
