"""The tour's registry of parts and the types a part takes and returns.

A part is a function ``run(ctx: Context) -> PartResult`` registered with :func:`part`
under a name; :data:`PARTS` holds them in registration order. A :class:`PartResult`
holds its own table (:class:`Column` s and :class:`Row` s of numbers), figures (see
``_report``), and findings. Values are numbers; they are formatted only when a
table is written (:meth:`Column.cell`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradtx.tour._data import Dataset

if TYPE_CHECKING:
  from gradtx.tour._report import Figure


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the tour; ``quick`` shrinks every part to run in about a minute."""

  quick: bool = False
  seeds: int = 3
  steps: int = 1500
  pretrain_steps: int = 1000
  finetune_steps: int = 400
  batch_size: int = 64

  @classmethod
  def make(cls, quick: bool, seeds: int | None = None) -> Config:
    if quick:
      return cls(quick=True, seeds=seeds or 2, steps=300, pretrain_steps=300,
                 finetune_steps=150)
    return cls(seeds=seeds or 3)


Value = float | int | None


def number(values: Mapping[str, Value], key: str) -> float:
  """``values[key]`` for a finding, which reads back only the numbers its part set.

  Raises:
    TypeError: the value is missing (``None``).
  """
  value = values[key]
  if value is None:
    raise TypeError(f"{key!r} is None: a finding needs a number there")
  return value


@dataclasses.dataclass(frozen=True)
class Column:
  """A column of a part's table: ``key`` into :attr:`Row.values`, its header and format.

  ``fmt`` is a format spec; ``spread`` names a value shown after this one as ``± spread``.
  A missing value shows as ``-``, a non-finite one as ``nan (diverged)``.

  Example:
    >>> from gradtx.tour import Column
    >>> Column("acc", "test acc", ".3f", spread="acc_std").cell({"acc": 0.95, "acc_std": 0.01})
    '0.950 ± 0.010'
  """

  key: str
  header: str
  fmt: str = ".3g"
  spread: str | None = None

  def cell(self, values: Mapping[str, Value]) -> str:
    value = values.get(self.key)
    if value is None:
      return "-"
    if not math.isfinite(value):
      return "nan (diverged)"
    text = format(value, self.fmt)
    if self.spread is not None and values.get(self.spread) is not None:
      text += f" ± {format(values[self.spread], self.fmt)}"
    return text


#: The columns most parts share: the final full-batch training loss and test accuracy.
TRAIN_LOSS = Column("train_loss", "train loss")
TEST_ACC = Column("test_acc", "test acc", ".3f", spread="test_acc_std")


@dataclasses.dataclass
class Row:
  """One line of a part's table: numbers keyed by the part's :class:`Column` keys.

  ``clean`` marks a supervised classifier trained on the plain task (no injected faults,
  no mis-set hyperparameter), whose ``test_acc`` must clear ``chance`` by far.
  """

  technique: str
  setting: str
  values: dict[str, Value]
  clean: bool = True
  chance: float | None = 0.1


@dataclasses.dataclass
class PartResult:
  """What a part returns: its table, figures, and findings (markdown lines)."""

  columns: list[Column]
  rows: list[Row]
  figures: list[Figure] = dataclasses.field(default_factory=list)
  findings: list[str] = dataclasses.field(default_factory=list)


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


def part(name: str, title: str, about: str,
         ) -> Callable[[Callable[[Context], PartResult]], Callable[[Context], PartResult]]:
  """Registers ``run(ctx) -> PartResult`` as a part of the tour, in definition order."""

  def register(run: Callable[[Context], PartResult]) -> Callable[[Context], PartResult]:
    if name in PARTS:
      raise ValueError(f"a tour part named {name!r} is already registered")
    PARTS[name] = Part(name, title, about.strip(), run)
    return run

  return register
