"""Training for the tour: one jit-compiled program per transformation, vmapped over runs.

:func:`train` runs ``R`` runs of one optax transformation as a ``lax.scan`` over steps,
``vmap``-ed over runs, and returns their logs as :class:`Runs`. The programs are compiled
with XLA's backend optimisations off (:func:`run_compiled`, :func:`init_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx.tour._data import Dataset

# The programs here are tiny: LLVM's optimisation passes cost far more than they save
# (initialisers and PRNG code compile ~10x faster without them); the runs are short.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def run_compiled(fn: Callable, *args: Any) -> Any:
  """``jax.jit(fn)(*args)``, compiled with XLA's backend optimisations off."""
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS)(*args)


def _init_params(model: nn.Module, keys: jax.Array) -> Any:
  return jax.vmap(lambda k: model.init(k, jnp.zeros((1, 64), jnp.float32)))(keys)


_init_params_jit = jax.jit(_init_params, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


def init_params(model: nn.Module, keys: jax.Array) -> Any:
  """One set of parameters per key, stacked along a leading axis (compiled once per model)."""
  return _init_params_jit(model, keys)


# --------------------------------------------------------------------------------------
# Training: one compiled program per transformation, vmapped over runs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runs:
  """What :func:`train` returns; every array has a leading axis of runs ``R``.

  Attributes:
    loss: ``[R, steps]`` minibatch loss at each step, before the update.
    train_loss: ``[R]`` full-batch loss on each run's training set after the last step.
    test_acc: ``[R]`` accuracy on the test split after the last step.
    params: the final parameters, stacked over runs.
    logs: ``{name: [R, steps]}``, what ``train(log_fn=...)`` recorded at every step.
    test_curve: ``[R, steps]`` test accuracy after every step (``track_test=True``).
  """

  loss: np.ndarray
  train_loss: np.ndarray
  test_acc: np.ndarray
  params: Any
  logs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  test_curve: np.ndarray | None = None


def _cross_entropy(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y)


def _evaluate(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array, x_test: jax.Array,
              y_test: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per run: full-batch training loss and test accuracy (runs on the leading axis)."""

  def one(p, x, y):
    return _cross_entropy(apply_fn, p, x, y), _accuracy(apply_fn, p, x_test, y_test)

  return jax.vmap(one)(params, x, y)


# Compiled once per model (``apply_fn`` is static), shared by every transformation.
_evaluate_jit = jax.jit(_evaluate, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


def train(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    params: Any,
    data: Dataset,
    *,
    steps: int,
    keys: jax.Array,
    batch_size: int = 64,
    train_idx: Any = None,
    per_run: Any = None,
    grad_hook: Callable[[Any, jax.Array, Any], Any] | None = None,
    log_fn: Callable[[Any, Any], dict[str, jax.Array]] | None = None,
    track_test: bool = False,
) -> Runs:
  """Trains ``R`` runs of one transformation in a single jit-compiled program.

  Each run minimises the cross-entropy of ``apply_fn`` on its own training examples
  with minibatches drawn (with replacement) from its own key; the loop over steps is a
  ``lax.scan`` and the runs are ``vmap``-ed, so the whole call compiles once.

  Args:
    apply_fn: ``(params, x) -> logits``.
    tx: the optax transformation (optimizer and techniques) under study.
    params: initial parameters stacked over runs (leading axis ``R``).
    data: the dataset; labels may be any integer task.
    steps: number of updates.
    keys: ``[R]`` PRNG keys that draw the minibatches.
    batch_size: minibatch size.
    train_idx: ``[R, n]`` indices of each run's training examples (default: all).
    per_run: a pytree of ``[R, ...]`` arrays, each run's slice handed to ``grad_hook``.
    grad_hook: ``(grads, step, run's per_run) -> grads``, applied to the gradient before
      ``tx`` (a part injects faults with it); ``None``: the gradient as is.
    log_fn: ``(grads handed to tx, optimizer state after the step) -> {name: scalar}``,
      recorded at every step into :attr:`Runs.logs`.
    track_test: also record the test accuracy after every step (costs a test-set
      forward pass per step).

  Returns:
    :class:`Runs` with numpy arrays.

  Longer than 60 lines only by this docstring: the code is about 40.
  """
  num_runs = keys.shape[0]
  if train_idx is None:
    train_idx = np.arange(data.x_train.shape[0])
  train_idx = np.broadcast_to(np.asarray(train_idx), (num_runs, np.shape(train_idx)[-1]))
  x = jnp.asarray(np.asarray(data.x_train)[train_idx])
  y = jnp.asarray(np.asarray(data.y_train)[train_idx])
  loss_fn = lambda p, x, y: _cross_entropy(apply_fn, p, x, y)

  def one_run(params, key, x, y, run_arg):
    def step(carry, inputs):
      params, opt_state = carry
      t, step_key = inputs
      batch = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, x[batch], y[batch])
      if grad_hook is not None:
        grads = grad_hook(grads, t, run_arg)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      logs: tuple[jax.Array | dict[str, jax.Array], ...] = (
          loss, {} if log_fn is None else log_fn(grads, opt_state))
      if track_test:
        logs += (_accuracy(apply_fn, params, data.x_test, data.y_test),)
      return (params, opt_state), logs

    inputs = (jnp.arange(steps), jax.random.split(key, steps))
    (params, _), logs = jax.lax.scan(step, (params, tx.init(params)), inputs)
    return params, logs

  params, logs = run_compiled(jax.vmap(one_run), params, keys, x, y, per_run)
  train_loss, test_acc = _evaluate_jit(apply_fn, params, x, y, data.x_test, data.y_test)
  logs, train_loss, test_acc = jax.device_get((logs, train_loss, test_acc))
  return Runs(np.asarray(logs[0]), np.asarray(train_loss), np.asarray(test_acc), params,
              {k: np.asarray(v) for k, v in logs[1].items()},
              np.asarray(logs[2]) if track_test else None)
