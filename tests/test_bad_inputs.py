"""Every bad input answered: one table of mistakes across every public function.

Each row asserts the error type and that the message names the argument (and the value,
or the pytree paths), or, for edge inputs that are not errors, the documented result
against an independent reference. The rows live next to their area in
``tests/bad_inputs_*.py``; this file gathers them into one parametrised table.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest

_AREAS = sorted(p.stem for p in pathlib.Path(__file__).parent.glob("bad_inputs_*.py"))
CASES = [case for area in _AREAS for case in importlib.import_module(area).CASES]


def test_the_table_covers_every_area():
  assert len(CASES) >= 150, len(CASES)
  ids = [case.id for case in CASES]
  assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case):
  if case.error is not None:
    with pytest.raises(case.error, match=case.match):
      case.call()
  else:
    case.check(case.call())
