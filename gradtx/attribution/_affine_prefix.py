r"""The affine first layers of a model, hoisted out of a straight-line path integral.

Integrated Gradients evaluates ``∇F`` at ``n`` points ``x_k = x' + α_k (x - x')`` of a
straight line. Most models start with layers that are affine in the input (a
convolution or a dense layer, a bias, a reshape): ``F = S ∘ A`` with
``A(x) = Lx + c``. On a straight line ``A`` stays a straight line,

.. math::
  A(x_k) = A(x') + \alpha_k \big(A(x) - A(x')\big), \qquad
  \sum_k w_k \nabla F(x_k) = L^\top \sum_k w_k \nabla S\big(A(x_k)\big),

so ``A`` runs twice per example (at ``x`` and ``x'``) and ``Lᵀ`` once, instead of both
``n`` times. The result is the same sum, rearranged (equal up to float rounding).

:func:`split` finds ``A`` in ``fn``'s jaxpr: the equations whose value is affine in
the inputs (linear primitives with every other operand independent of the inputs). The
*cut* is the set of affine values that the rest of the function reads. The split is
only made when ``A`` holds a matrix product or a convolution; otherwise there is
nothing worth hoisting and the caller keeps ``fn`` as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core

# Which operands may depend on the inputs for the primitive to stay affine in them:
# exactly one (a product), any (a sum), the only one, or the first (a quotient's
# numerator, a padded or indexed array; the divisor, padding value or indices may not).
_LINEAR_IN_ONE = frozenset({"mul", "dot_general", "conv_general_dilated"})
_LINEAR_JOINTLY = frozenset({"add", "add_any", "sub", "concatenate"})
_LINEAR_UNARY = frozenset({
    "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze", "rev", "slice",
    "reduce_sum", "copy", "cumsum"})
_LINEAR_IN_FIRST = frozenset({"div", "pad", "dynamic_slice", "gather"})
_HEAVY = frozenset({"dot_general", "conv_general_dilated"})
_CALLS = frozenset({"jit"})  # a nested jax.jit: affine if everything inside is


class Split(NamedTuple):
  """``fn = suffix ∘ prefix`` with ``prefix`` affine in its arguments."""

  prefix: Callable[[list[jax.Array]], list[jax.Array]]  # arguments -> cut values
  suffix: Callable[[list[jax.Array]], Any]  # cut values -> fn's output


def _is_affine(eqn: core.JaxprEqn, depends: Sequence[bool]) -> bool:
  """Whether ``eqn``'s outputs are affine in its operands marked by ``depends``."""
  name = eqn.primitive.name
  if name in _LINEAR_UNARY or name in _LINEAR_JOINTLY:
    return True
  if name in _LINEAR_IN_ONE:
    return sum(depends) == 1
  if name in _LINEAR_IN_FIRST:
    return depends[0] and not any(depends[1:])
  if name == "convert_element_type":
    source = getattr(eqn.invars[0].aval, "dtype", None)
    return (source is not None and jnp.issubdtype(source, jnp.floating)
            and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating))
  if name == "select_n":  # the predicate must not depend on x
    return not depends[0]
  if name in _CALLS:
    inner = eqn.params["jaxpr"].jaxpr
    return all(kind != "other" for kind in _classify(inner, depends)[0])
  return False


def _classify(jaxpr: core.Jaxpr, depends: Sequence[bool]) -> tuple[list[str], set]:
  """Each equation's kind and the set of affine variables.

  ``depends`` marks the invars that are the inputs. An equation is "const" when it
  reads nothing that depends on them, "affine" when its outputs are affine in them, and
  "other" otherwise.
  """
  dependent = {v for v, d in zip(jaxpr.invars, depends, strict=True) if d}
  affine = set(dependent)
  kinds = []
  for eqn in jaxpr.eqns:
    marks = [isinstance(v, core.Var) and v in dependent for v in eqn.invars]
    if not any(marks):
      kinds.append("const")
      continue
    dependent.update(eqn.outvars)
    if all(v in affine for v, m in zip(eqn.invars, marks, strict=True) if m) and _is_affine(
        eqn, marks):
      kinds.append("affine")
      affine.update(eqn.outvars)
    else:
      kinds.append("other")
  return kinds, affine


def _is_heavy(eqn: core.JaxprEqn) -> bool:
  """Whether ``eqn`` is (or calls) a matrix product or a convolution."""
  if eqn.primitive.name in _CALLS:
    return any(_is_heavy(e) for e in eqn.params["jaxpr"].jaxpr.eqns)
  return eqn.primitive.name in _HEAVY


def split(fn: Callable[[list[jax.Array]], Any], args: list[jax.Array]) -> Split | None:
  """``fn``'s affine prefix and the rest, or ``None`` when no heavy op can be hoisted."""
  closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(args)
  jaxpr = closed.jaxpr
  if jaxpr.effects:
    return None
  kinds, affine = _classify(jaxpr, [True] * len(jaxpr.invars))
  if not any(k == "affine" and _is_heavy(e) for k, e in zip(kinds, jaxpr.eqns, strict=True)):
    return None
  read_later = [v for e, k in zip(jaxpr.eqns, kinds, strict=True) if k == "other"
                for v in e.invars] + list(jaxpr.outvars)
  cut = list(dict.fromkeys(v for v in read_later
                           if isinstance(v, core.Var) and v in affine))
  out_tree = jax.tree.structure(out_shapes)
  debug_info = jaxpr.debug_info.with_unknown_names()  # new inputs and outputs
  part = lambda invars, outvars, keep: core.ClosedJaxpr(core.Jaxpr(
      jaxpr.constvars, invars, outvars,
      [e for e, k in zip(jaxpr.eqns, kinds, strict=True) if k in keep],
      debug_info=debug_info), closed.consts)
  prefix = core.jaxpr_as_fun(part(jaxpr.invars, cut, ("const", "affine")))
  suffix = core.jaxpr_as_fun(part(cut, jaxpr.outvars, ("const", "other")))
  return Split(lambda values: prefix(*jax.tree.leaves(values)),
               lambda cut_values: jax.tree.unflatten(out_tree, suffix(*cut_values)))
