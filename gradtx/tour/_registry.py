"""The tour's registry of parts and the types a part takes and returns.

A part is a function ``run(ctx: Context) -> PartResult`` registered with :func:`part`
under a name; :data:`PARTS` holds them in registration order. A :class:`PartResult`
holds table :class:`Row` s, :class:`Figure` s of :class:`Panel` s, and findings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from gradtx.tour._data import Dataset

_SPIKE_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the tour; ``quick`` shrinks every part to run in well under a minute."""

  quick: bool = False
  seeds: int = 3
  steps: int = 1500
  pretrain_steps: int = 1000
  finetune_steps: int = 400
  batch_size: int = 64
  spike_every: int = _SPIKE_EVERY
  optimizers: tuple[str, ...] = ("sgd", "adam")

  @classmethod
  def make(cls, quick: bool, seeds: int | None = None) -> Config:
    if quick:
      return cls(quick=True, seeds=seeds or 2, steps=300, pretrain_steps=300,
                 finetune_steps=150, optimizers=("sgd",))
    return cls(seeds=seeds or 3)


@dataclasses.dataclass
class Row:
  """One line of a results table: means over seeds (``test_acc_std``: their spread).

  ``clipped_steps`` is the mean number of steps with ``clip_scale < 1`` (``None`` when
  the transformation has no ``clip_scale``); ``clean`` says whether the run saw only
  the plain task (no injected faults); ``chance`` is the accuracy of guessing.
  ``extras`` are more columns, shown in the part's own table in ``report.md``.
  """

  technique: str
  setting: str
  train_loss: float
  test_acc: float
  test_acc_std: float = 0.0
  clipped_steps: float | None = None
  steps: int = 0
  clean: bool = True
  chance: float = 0.1
  extras: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Panel:
  """One axes of a figure: named curves, over steps unless ``x`` is given.

  Or an ``image`` (2-D, e.g. heatmaps tiled into one array) instead of curves, drawn on
  a diverging colour scale symmetric around 0 (NaN pixels blank); ``x`` and
  ``xticklabels`` then label its columns, and ``logy``/``ymax``/``vlines`` are unused.
  """

  title: str
  curves: dict[str, np.ndarray]
  ylabel: str = "loss"
  logy: bool = True
  vlines: Sequence[float] = ()
  x: Sequence[float] | None = None
  xlabel: str = "step"
  xticklabels: Sequence[str] | None = None
  ymax: float | None = None
  image: np.ndarray | None = None


@dataclasses.dataclass
class Figure:
  """A PNG: ``name`` is the file stem; panels are laid out in a row.

  A label keeps its colour across the panels of a figure.
  """

  name: str
  title: str
  panels: list[Panel]


@dataclasses.dataclass
class PartResult:
  """What a part returns: rows for the tables, figures, and findings in markdown."""

  rows: list[Row]
  figures: list[Figure] = dataclasses.field(default_factory=list)
  findings: str = ""


@dataclasses.dataclass
class Context:
  """What a part receives: the configuration, the data and a progress wrapper."""

  config: Config
  data: Dataset
  progress: bool = True
  part_name: str = ""

  def track(self, items: Sequence[Any]) -> Iterable[Any]:
    """``tqdm`` over the part's runs (silent with ``--no-progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=self.part_name, unit="run", disable=not self.progress,
                leave=False)


@dataclasses.dataclass(frozen=True)
class Part:
  """A registered part of the tour."""

  name: str
  title: str
  about: str
  run: Callable[[Context], PartResult]


PARTS: dict[str, Part] = {}


def part(name: str, title: str, about: str) -> Callable:
  """Registers ``run(ctx) -> PartResult`` as a part of the tour, in definition order."""

  def register(run: Callable[[Context], PartResult]) -> Callable[[Context], PartResult]:
    if name in PARTS:
      raise ValueError(f"a tour part named {name!r} is already registered")
    PARTS[name] = Part(name, title, about.strip(), run)
    return run

  return register
