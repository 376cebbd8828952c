"""What every task answers: the one place where segmentation and reconstruction differ.

A stage, predict, cost, the registry, the UI and the CLI ask ``TASKS[name]`` (a
:class:`Task`) instead of branching on the task's name. A third task is one more module in
this package that subclasses :class:`Task`, plus its params.yaml sections.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..inference import Predictor
    from ..train import ModelSpec

Validate = Callable[[nn.Module, torch.device], dict[str, float]]
Training = tuple["ModelSpec", nn.Module, Dataset, Validate]


class Task(ABC):
    """One task: its data, networks, metric, ensemble objective, predict I/O and report."""

    name: ClassVar[str]
    key_metric: ClassVar[str]  # what the ensemble search maximises
    summary_metrics: ClassVar[tuple[str, ...]]  # the scores the methods table keeps
    ensemble_keys: ClassVar[frozenset[str]]  # params.yaml ensemble.<task> keys it accepts
    mixup: ClassVar[bool] = False  # batch-level mixup applies (a multi-class loss)
    guard: ClassVar[str] = "none"  # the baseline no shipped member may fall below on val
    input_kinds: ClassVar[tuple[str, ...]]  # predict: the file kinds it takes
    expected_inputs: ClassVar[str]  # predict: those kinds in words
    report_columns: ClassVar[tuple[tuple[str, str, str], ...]]  # (split, metric, header)
    report_baselines: ClassVar[tuple[tuple[str, str], ...]]  # (baseline key, row label)
    report_gain_notes: ClassVar[tuple[tuple[str, str, str], ...]] = ()  # (metric, name, unit)
    flag_metric: ClassVar[str]  # the per-case score the uncertainty flag compares
    probabilistic: ClassVar[bool] = False  # outputs are class probabilities (calibration)

    @property
    @abstractmethod
    def nets(self) -> Mapping[str, Callable[..., nn.Module]]:
        """Architecture name -> builder (:mod:`mri_ensemble.nets`)."""

    @property
    @abstractmethod
    def ensemble_methods(self) -> tuple[str, ...]:
        """The weight searches that apply (:data:`mri_ensemble.ensemble.METHODS`)."""

    # ------------------------------------------------------------------ data stages
    @abstractmethod
    def ingest(self, p: dict[str, Any], seed: int, out: Path) -> None:
        """Read ``ingest.<task>``'s source and write the prepared split files into ``out``."""

    @abstractmethod
    def augment(self, p: dict[str, Any], seed: int, train: Path, out: Path) -> tuple[int, int]:
        """Write the augmented training set; (slices in, slices out)."""

    @abstractmethod
    def read(self, path: Path) -> Any:
        """A prepared split file (``data/prepared/<task>/<split>.h5``)."""

    # ------------------------------------------------------------------ training
    @abstractmethod
    def training(self, entry: dict[str, Any], train: Path, val: Path, seed: int) -> Training:
        """Network spec, loss, training set and validation function of one train entry."""

    def distillation(
        self,
        entry: dict[str, Any],
        train: Path,
        val: Path,
        seed: int,
        teacher: Predictor,
        alpha: float,
    ) -> Training:
        """A student's training against ``teacher`` (the shipped ensemble): as
        :meth:`training` for ``entry``, with the teacher's outputs on the training set
        blended into the targets (``alpha``: the teacher's share); validation stays on the
        labels. ConfigError where the task has no distillation."""
        raise ConfigError(f"distillation is not available for {self.name}")

    def check_arch(self, arch: str) -> None:
        if arch not in self.nets:
            raise ConfigError(
                f"unknown {self.name} model {arch!r}; known: {', '.join(sorted(self.nets))}"
            )

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def predict(
        self, model: nn.Module, data: Any, device: torch.device, progress: bool, desc: str
    ) -> np.ndarray:
        """One model's outputs on a prepared split, as the ensemble fuses them."""

    @abstractmethod
    def score(self, outputs: np.ndarray, truth: np.ndarray, case: np.ndarray, names: Any) -> dict:
        """The task's scores of (fused or single) outputs against the truth, per case."""

    @abstractmethod
    def truth(self, data: Any) -> np.ndarray:
        """What outputs are scored against: labels or target images."""

    @abstractmethod
    def class_names(self, data: Any) -> list[str]:
        """Names of the output classes ([] for image outputs)."""

    @abstractmethod
    def write_outputs(
        self, path: Path, outputs: np.ndarray, case: np.ndarray, attrs: Mapping[str, Any]
    ) -> None:
        """Save one model's outputs of a split (``data/predictions/<task>/<model>/``)."""

    @abstractmethod
    def read_outputs(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, case) as :meth:`write_outputs` saved them."""

    # ------------------------------------------------------------------ ensemble
    @abstractmethod
    def ensemble_inputs(self, models: list[str], predictions: Path, data: Path) -> dict[str, Any]:
        """Objectives of val, test and the shifted sets, class names, baselines, and what
        fusing needs beyond the outputs (reconstruction: the measured k-space)."""

    @abstractmethod
    def fusable(self, outputs: torch.Tensor) -> torch.Tensor:
        """A member's raw network output as the ensemble averages it (probabilities, or
        the image in float32)."""

    @abstractmethod
    def uncertainty_maps(self, outputs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Per-pixel uncertainty maps (N, H, W) of the members' fusable outputs (M, N, ...)
        fused with ``weights`` (:mod:`mri_ensemble.ensemble.uncertainty`); the first is the
        one the report, the case flag and predict use."""

    @abstractmethod
    def error_map(self, fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """Per-pixel error (N, H, W) float32 of a fused output against the truth."""

    def check_weights(self, weights: np.ndarray) -> None:
        """Refuse weights this task cannot fuse (default: any (M,) or (M, K) is fine)."""
        return None

    def check_ensemble(self, path: Path, method: str, weights: Mapping[str, Any]) -> None:
        """Refuse an ``ensemble.json`` whose method or weights this task cannot apply."""
        return None

    def output_classes(
        self, root: Path, params: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]
    ) -> list[str]:
        """Names of the classes the members (checkpoint ``spec`` by name) predict ([])."""
        return []

    # ------------------------------------------------------------------ cost
    @abstractmethod
    def batch_inputs(self, data: Path, batch: int) -> tuple[torch.Tensor, ...]:
        """The first ``batch`` slices of a prepared file as one network input."""

    # ------------------------------------------------------------------ predict
    @abstractmethod
    def predict_file(
        self,
        predictor: Predictor,
        path: Path,
        batch_size: int | None,
        progress: bool,
        pixel_mm: float | None = None,
    ) -> Any:
        """Run ``predictor`` on one of a user's files (already checked to be of this task)."""

    @abstractmethod
    def save_result(self, result: Any, out: Path) -> None:
        """Write what :meth:`predict_file` returned to ``out``, atomically."""

    @abstractmethod
    def describe_result(self, result: Any) -> str:
        """A few words on a result for the CLI's line (shape, what was found)."""

    @abstractmethod
    def output_suffixes(self, kind: str) -> Sequence[str]:
        """The output names that fit an input of ``kind``."""

    @abstractmethod
    def check_input(self, path: Path, kind: str, settings: Mapping[str, Any], pixel_mm) -> None:
        """Read and check one input before any model loads (DataError naming the file)."""

    @abstractmethod
    def predict_array(self, predictor: Predictor, model_input: Any) -> np.ndarray:
        """The registry's pyfunc ``predict``: an array or file path in, an array out."""

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<task {self.name}>"
