"""The gradtx tour: every technique trains small real models on ``load_digits``.

Run it with ``python -m gradtx.tour`` (minutes on a laptop CPU; the README gives measured
times) or ``python -m gradtx.tour --quick``. It prints one table per part and writes
``tour_report/`` (``tour_report/quick/`` with ``--quick``; ``--out``): ``report.md`` with
the tables and a short explanation per part, ``results.json`` with every number, and one
PNG per figure (curves or heatmaps). A run of some parts (``--only``) merges into the
report of the same sizes; no run overwrites a full report with other sizes.

The data is scikit-learn's offline copy of the UCI handwritten digits (1797 8×8 images,
10 classes), standardised with the training split's statistics; nothing is downloaded.

The tour is a registry of *parts*. A part is a function ``run(ctx) -> PartResult``
registered with :func:`part`; it trains what it wants with :func:`train` (one
jit-compiled ``lax.scan`` per transformation, ``vmap``-ed over seeds and scenarios)
and returns its own table (:class:`Column` s and :class:`Row` s of numbers), figures,
and findings worded from the numbers (:func:`direction`). ``--only NAME`` runs a subset
of the parts; ``--list`` names them.

The package, one job per module:

- ``_data``: the digits (:func:`load_data`, :class:`Dataset`) and the :class:`MLP`.
- ``_training``: :func:`train`, :class:`Runs` and the compiled helpers
  (:func:`init_params`, :func:`run_compiled`).
- ``_registry``: :func:`part`, :data:`PARTS`, :class:`Part`, :class:`Config`,
  :class:`Context`, :class:`PartResult`, :class:`Column`, :class:`Row`.
- ``_report``: :class:`Figure` s of :class:`Panel` s, values and curves from runs
  (``run_values``, ``mean_curve``, :func:`smooth`), words from numbers
  (:func:`direction`), the tables (:func:`format_table`), the PNGs and
  :func:`write_report`.
- ``_cli``: the command line, :func:`main`.
- one module per part: ``layerwise``, ``clipping``, ``contrastive``, ``attribution``, ``step_size``,
  ``em``, ``child_tuning``, ``zeroth_order``.

Adding a technique to the tour means adding one module, ``gradtx/tour/my_technique.py``::

  from gradtx.tour._registry import TEST_ACC, Context, PartResult, part

  @part("my_technique", "Title", "What the part shows, in markdown.")
  def _my_technique(ctx: Context) -> PartResult:
    ...
    return PartResult([TEST_ACC, ...], rows, figures, findings)

and one import line in the block at the end of this file: importing the module registers
the part, and the tour runs the parts in the order of those imports. A part module
imports only the private modules above, never ``gradtx.tour`` itself.

Importing this package has no side effects: the data, scikit-learn and matplotlib are
loaded only when a part runs.
"""

from gradtx.tour._cli import main
from gradtx.tour._data import MLP, MLP_DEPTH_RULES, Dataset, load_data
from gradtx.tour._registry import (
    PARTS,
    TEST_ACC,
    TRAIN_LOSS,
    Column,
    Config,
    Context,
    Part,
    PartResult,
    Row,
    part,
)
from gradtx.tour._report import Figure, Panel, direction, format_table, smooth, write_report
from gradtx.tour._training import Runs, init_params, run_compiled, train

# The parts, in the order the tour runs them: importing a part's module registers it.
# isort: off
from gradtx.tour import layerwise  # noqa: F401
from gradtx.tour import clipping  # noqa: F401
from gradtx.tour import child_tuning  # noqa: F401
from gradtx.tour import contrastive  # noqa: F401
from gradtx.tour import attribution  # noqa: F401
from gradtx.tour import step_size  # noqa: F401
from gradtx.tour import em  # noqa: F401
from gradtx.tour import zeroth_order  # noqa: F401
# isort: on

__all__ = (
    "MLP",
    "MLP_DEPTH_RULES",
    "PARTS",
    "TEST_ACC",
    "TRAIN_LOSS",
    "Column",
    "Config",
    "Context",
    "Dataset",
    "Figure",
    "Panel",
    "Part",
    "PartResult",
    "Row",
    "Runs",
    "direction",
    "format_table",
    "init_params",
    "load_data",
    "main",
    "part",
    "run_compiled",
    "smooth",
    "train",
    "write_report",
)
