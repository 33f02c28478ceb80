"""The bad-input table's row type, shared by the per-area case lists ``tests/bad_inputs_*.py``.

A row calls gradtx the way a user who made one mistake would, and says what must happen:
an error of ``error`` type whose message matches ``match`` (a regex that names the
argument, and the value or paths where the issue asks for them), or, for inputs that are
not errors, ``check(result)`` asserting the documented result against an independent
reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad or edge input: ``call()`` must raise ``error`` matching ``match``, or pass
  ``check``."""

  id: str
  call: Callable[[], Any]
  error: type[BaseException] | None = None
  match: str | None = None
  check: Callable[[Any], None] | None = None

  def __post_init__(self):
    if (self.error is None) == (self.check is None):
      raise ValueError(f"case {self.id}: give exactly one of error= and check=")
    if self.error is not None and not self.match:
      raise ValueError(f"case {self.id}: an error case must say what its message names")
