"""Zeroth-order gradients (OpenAI-ES, arXiv:1703.03864): speed, lean memory, digits training.

Claims: ``gradtx.zeroth_order("es", ...)`` produces OpenAI-ES gradient estimates at least
as fast as evosax's ``Open_ES`` (target: estimates per second >= 1.0x evosax's, same
population and function), computes the same estimate for the same noise (to ~1e-5),
``lean=True`` keeps the estimate's compiled memory near one inference while the default
(vmapped, materialised) population grows with its size, and ES and REINFORCE both train a
classifier on its (non-differentiable) accuracy.

**Speed and agreement (main table).** Every generation is one gradient estimate of the
population's fitness and one SGD step on the mean (learning rate 1e-3). ``σ`` = 0.05,
mirrored (antithetic) sampling, centered-rank fitness shaping (evosax's default), the
population size N the same on both sides, float32:

- *gradtx*: ``optax.chain(gradtx.zeroth_order("es", key=k, sigma=σ, num_samples=N,
  shaping="centered_rank"), optax.sgd(1e-3))`` (the default: the population vmapped);
- *gradtx lean*: the same with ``lean=True`` (one member at a time), for context;
- *evosax*: ``Open_ES(population_size=N, solution=params, optimizer=optax.sgd(1e-3),
  std_schedule=optax.constant_schedule(σ))``; ``ask`` → ``jax.vmap(fitness)`` → ``tell``.

Functions: a quadratic ``Σ_k a_k (θ_k - t_k)²`` of 10,000 parameters, N = 64 (noise
generation dominates), and the mean softmax cross-entropy of an MLP 64 → 128 → 10 (9,610
parameters, a dict of four leaves) on a fixed batch of 256 digits, N = 64 and 256 (the
forward passes dominate). Each timed call runs 20, 5 or 3 generations in one
jit-compiled ``lax.scan`` (AOT-compiled first); calls are timed in interleaved rounds
(``_common.time_interleaved``, 20 rounds after 2 warm-up rounds); "gradtx / evosax" is
the median over rounds of the same-round *throughput* ratio (evosax time / gradtx time:
> 1 means gradtx is faster), with a bootstrap 95% CI; XLA's static cost analysis of the
compiled programs gives their FLOPs ratio. evosax is optional (``pip install -e
".[evosax]"``, evosax >= 0.3); without it (or with ``--no-evosax``) the evosax columns are
empty and the run says so.

Agreement, for every row (max absolute difference over parameters, and the same divided by
``max |ĝ|``):

- *gradtx vs numpy*: ``gradtx.es_gradient`` against a float64 numpy evaluation of the
  documented formula ``ĝ = (1/(Nσ)) Σ_j (w_{j,+} - w_{j,-}) ε_j`` (centered ranks ``w``
  over the 2P fitness values, ties by position), with pair ``j``'s noise regenerated as
  documented: ``fold_in(key, j)`` then ``fold_in(·, crc32(leaf path) & 0x7FFFFFFF)``;
- *gradtx vs evosax, same noise*: gradtx's noise fed to evosax as its population
  (``mean + σ·[ε; -ε]``, evosax's antithetic layout) and evosax's ``tell`` gradient
  (captured by an optimizer that stores it) compared with ``gradtx.es_gradient`` for the
  same key, with centered-rank and with raw fitness;
- *evosax vs numpy*: evosax's own ``ask`` population (its noise ``(x - mean)/σ``) and its
  ``tell`` gradient against the numpy formula above applied to that population.

**Memory** (section ``memory``): ``jax.jit(f).lower(...).compile().memory_analysis()`` of
one estimate (N = 32, ``σ`` = 0.05, centered ranks) of the cross-entropy on 64 digits of a
bias-free MLP 64 → H → 10 whose two kernels live in one (74, H) array, H chosen for 1e6 and
1e7 parameters (the memory depends on the parameter count, not on the tree; one leaf also
keeps XLA:CPU's compile of the estimator short): materialised (the default: the population
vmapped), chunked (``batch_size=4``) and lean; one forward pass and one backprop gradient
for context. "temp" is XLA's temporaries (arguments and outputs excluded). 1e7 is
compiled only; at 1e6 the three modes are also executed and must give the same estimate
(same key; ``max |Δĝ|``).

**Training** (section ``training``): the MLP 64 → 128 → 10 (9,610 parameters) on
``load_digits`` (``gradtx.tour.load_data``: stratified 70/30 split, standardised per
pixel; 1257 train, 540 test images); the same initialisation and the same sequence of
training batches (each 256 distinct training images, drawn uniformly) for:

- *ES on accuracy*: minimise ``-accuracy`` (argmax on the batch: piecewise constant) with
  ``optax.chain(gradtx.zeroth_order("es", sigma=0.1, num_samples=100,
  shaping="centered_rank"), optax.adam(0.02))``;
- *REINFORCE on accuracy*: the classifier as a categorical policy; a sample is one image
  of the batch (uniform) and a class drawn from ``softmax(logits)``, reward 1 if the class
  is right, else 0; ``gradtx.score_function_gradient`` with 256 samples and the
  leave-one-out mean baseline, ascended with ``optax.adam(0.003)``;
- *backprop on cross-entropy*: ``jax.grad`` of the mean softmax cross-entropy,
  ``optax.adam(0.003)``.

Function evaluations are counted as forward passes of the model over the training batch:
ES uses N per step (mirrored pairs with rank shaping need no ``f(θ)``); REINFORCE uses 1
per step (its samples share one forward pass over the batch: the logits do not depend on
the sample) plus one backward pass; backprop uses 1 plus one backward pass (a backward
pass costs about two forward passes). Test accuracy is recorded every 40 steps.

``--quick``: a smoke run of the same structure whose numbers mean little: the quadratic
row only (1,000 parameters, N = 8; the MLP's estimator takes XLA:CPU seconds to compile),
memory at 1e4 parameters, a bias-free linear classifier 64 → 10 trained 40 steps (ES with
N = 8), 3 rounds. ``--no-evosax``: skip evosax even if installed (CI's path).
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import os
import time
import zlib
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

import gradtx

NAME = "zeroth_order"
SIGMA = 0.05
SPEED_LR = 1e-3
TARGET = {"vs_evosax_min": 1.0, "agreement_rel": 1e-5}
MEMORY_POPULATION = 32
MEMORY_BATCH = 64
MEMORY_CHUNK = 4
MLP_HIDDEN = 128
SPEED_BATCH = 256
TRAIN_BATCH = 256
TRAIN = {"steps": 1000, "eval_every": 40, "es_population": 100, "es_sigma": 0.1,
         "es_learning_rate": 0.02, "reinforce_learning_rate": 0.003,
         "backprop_learning_rate": 0.003}


# --------------------------------------------------------------------------- models


def init_mlp(key: jax.Array, hidden: int, inputs: int = 64, classes: int = 10) -> dict:
  """``hidden``: 64 → H (ReLU), ``head``: H → 10; He-normal kernels, zero biases."""
  return _common.init_dense(key, [inputs, hidden, classes], ["hidden", "head"],
                            gains=(2.0, 1.0))


def init_linear(key: jax.Array, inputs: int = 64, classes: int = 10) -> dict:
  """A bias-free linear classifier ``{"head": {"kernel"}}`` (``--quick``'s training model)."""
  return {"head": {"kernel": jax.random.normal(key, (inputs, classes)) * inputs ** -0.5}}


def init_packed(key: jax.Array, num_params: int, inputs: int = 64, classes: int = 10) -> dict:
  """A bias-free MLP 64 → H → 10 whose two kernels share one (74, H) leaf ``"w"``."""
  hidden = max(1, round(num_params / (inputs + classes)))
  return {"w": jax.random.normal(key, (inputs + classes, hidden)) * (2.0 / inputs) ** 0.5}


def logits(params, x):
  """MLP (``hidden`` + ``head``), packed MLP (``w``) or linear (``head`` only) logits."""
  if "w" in params:
    inputs = x.shape[-1]
    h = jax.nn.relu(x @ params["w"][:inputs])
    return h @ params["w"][inputs:].T / params["w"].shape[1] ** 0.5
  if "hidden" in params:
    x = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  out = x @ params["head"]["kernel"]
  return out + params["head"]["bias"] if "bias" in params["head"] else out


def cross_entropy(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(logits(params, x), -1) == y)


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def load_digits():
  from gradtx.tour import load_data

  return load_data()


def speed_problems(quick: bool, data) -> list[dict[str, Any]]:
  """The function, parameters, population and generations per call of every speed row."""
  dim = 1_000 if quick else 10_000
  ka, kt, kp = jax.random.split(jax.random.key(1), 3)
  a = jax.random.uniform(ka, (dim,), minval=0.5, maxval=2.0)
  t = jax.random.normal(kt, (dim,))
  quadratic = lambda p: jnp.sum(a * jnp.square(p["w"] - t))
  problems = [{"problem": "quadratic", "fitness": quadratic,
               "params": {"w": 0.1 * jax.random.normal(kp, (dim,))},
               "population": 8 if quick else 64, "generations": 4 if quick else 20}]
  if quick:  # the MLP's estimator takes XLA:CPU seconds to compile: not in the smoke run
    return problems
  x, y = data.x_train[:SPEED_BATCH], data.y_train[:SPEED_BATCH]
  mlp = lambda p: cross_entropy(p, x, y)
  mlp_params = init_mlp(jax.random.key(2), MLP_HIDDEN)
  for n, generations in ((64, 5), (256, 3)):
    problems.append({"problem": f"mlp_digits (batch {SPEED_BATCH})", "fitness": mlp,
                     "params": mlp_params, "population": n, "generations": generations})
  return problems


# --------------------------------------------------------------------------- evosax


def load_evosax(disabled: bool) -> tuple[Any, dict[str, Any]]:
  """``(Open_ES class or None, info)``; ``info`` says why evosax was or was not used."""
  if disabled:
    return None, {"available": False, "note": "skipped (--no-evosax)"}
  try:
    from evosax.algorithms import Open_ES
  except Exception as error:  # noqa: BLE001 - any import failure means "not available"
    return None, {"available": False,
                  "note": f"not installed or not importable ({type(error).__name__}: "
                          f"{error}); pip install -e \".[evosax]\" to compare"}
  return Open_ES, {"available": True, "note": "measured",
                   "evosax": importlib.metadata.version("evosax")}


def _grad_catcher() -> optax.GradientTransformation:
  """An optimizer that stores the gradient it receives in its state and moves nothing."""
  return optax.GradientTransformation(
      lambda params: jnp.zeros_like(params),
      lambda updates, state, params=None: (jnp.zeros_like(updates), updates))


def evosax_gradient(open_es, params, fitness, population, *, shaping: str) -> np.ndarray:
  """evosax ``Open_ES.tell``'s gradient (flat) for a given flat population."""
  from evosax.core.fitness_shaping import (
      centered_rank_fitness_shaping_fn,
      identity_fitness_shaping_fn,
  )

  shaping_fn = (centered_rank_fitness_shaping_fn if shaping == "centered_rank"
                else identity_fitness_shaping_fn)
  es = open_es(population_size=population.shape[0], solution=params,
               optimizer=_grad_catcher(), std_schedule=optax.constant_schedule(SIGMA),
               fitness_shaping_fn=shaping_fn)
  es_params = es.default_params
  state = es.init(jax.random.key(0), params, es_params)
  unravel = ravel_pytree(params)[1]
  members = jax.vmap(unravel)(population)
  values = jax.jit(jax.vmap(fitness))(members)
  state, _ = es.tell(jax.random.key(0), members, values, state, es_params)
  return np.asarray(state.opt_state, np.float64)


def evosax_own_population(open_es, params, fitness, n, key):
  """evosax's ``ask`` population (flat, float64), its fitness, and its ``tell`` gradient."""
  es = open_es(population_size=n, solution=params, optimizer=_grad_catcher(),
               std_schedule=optax.constant_schedule(SIGMA))
  es_params = es.default_params
  state = es.init(jax.random.key(0), params, es_params)
  members, state = es.ask(key, state, es_params)
  values = jax.jit(jax.vmap(fitness))(members)
  state, _ = es.tell(key, members, values, state, es_params)
  flat = jax.vmap(lambda m: ravel_pytree(m)[0])(members)
  return (np.asarray(flat, np.float64), np.asarray(values, np.float64),
          np.asarray(state.opt_state, np.float64), np.asarray(state.mean, np.float64))


# ------------------------------------------------------------------ numpy references


TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))  # Wellons' mixer


def hash_normal(leaf_key, size: int) -> np.ndarray:
  """A leaf's documented Gaussian noise in numpy: entry ``k`` hashed by two keyed rounds
  of ``triple32``, its top 23 bits a uniform on (-1, 1), ``√2 erfinv`` in float64."""
  s0, s1 = (np.uint32(s) for s in np.asarray(jax.random.bits(leaf_key, (2,), jnp.uint32)))
  h = np.arange(size, dtype=np.uint32) * (s1 | np.uint32(1)) + s0
  for tweak in (s1, np.uint32(0)):
    for shift, multiplier in TRIPLE32:
      h = (h ^ (h >> np.uint32(shift))) * np.uint32(multiplier)
    h = h ^ (h >> np.uint32(14)) ^ tweak
  low = np.nextafter(np.float32(-1), np.float32(1))
  unit = ((h >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
  uniform = np.maximum(low, unit * (np.float32(1) - low) + low)
  return np.sqrt(2.0) * scipy.special.erfinv(uniform.astype(np.float64))


def documented_noise(key, pairs: int, params) -> np.ndarray:
  """Pair ``j``'s noise as documented, flattened like ``ravel_pytree``: (pairs, D) float32.

  ``fold_in(key, j)``, then ``fold_in(·, crc32(leaf path) & 0x7FFFFFFF)`` per leaf, the
  counter-hash Gaussian of the leaf's entries (:func:`hash_normal`); leaves in
  ``jax.tree.leaves`` order (sorted keys).
  """
  flat_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = ["/".join(str(k.key) for k in path) for path, _ in flat_with_path]
  rows = []
  for j in range(pairs):
    member = jax.random.fold_in(key, j)
    rows.append(np.concatenate([
        hash_normal(jax.random.fold_in(member, zlib.crc32(path.encode()) & 0x7FFFFFFF),
                    leaf.size)
        for path, (_, leaf) in zip(paths, flat_with_path, strict=True)]).astype(np.float32))
  return np.stack(rows)


def numpy_centered_ranks(values: np.ndarray) -> np.ndarray:
  """Centered ranks, ties sharing their average rank (a numpy loop)."""
  order = np.sort(values)
  ranks = np.array([np.mean(np.flatnonzero(order == v)) for v in values])
  return ranks / max(values.size - 1, 1) - 0.5


def numpy_es_gradient(plus: np.ndarray, minus: np.ndarray, eps: np.ndarray, *,
                      shaping: str | None) -> np.ndarray:
  """float64 ``(1/(Nσ)) Σ_j (w_{j,+} - w_{j,-}) ε_j``; members ordered (j, ±) as gradtx's."""
  values = np.stack([plus, minus], axis=1).reshape(-1)
  w = numpy_centered_ranks(values) if shaping == "centered_rank" else values
  w = w.reshape(-1, 2)
  return (w[:, 0] - w[:, 1]) @ eps.astype(np.float64) / (2 * eps.shape[0] * SIGMA)


def diff(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  max_abs = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
  scale = float(np.max(np.abs(reference)))
  return {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs,
          "scale": scale}


def near_tie_references(plus: np.ndarray, minus: np.ndarray, eps: np.ndarray,
                        rounding: float) -> tuple[list[np.ndarray], int]:
  """The centered-rank references for every order of the near-tied members.

  Members whose float32 fitness differ by at most ``rounding`` (how much the fitness moves
  between two evaluation orders of the same member) have no determined rank order: a
  vmapped evaluation in another batch shape may swap them. Up to 4 such adjacent pairs,
  each order gives one admissible reference.
  """
  values = np.stack([plus, minus], axis=1).reshape(-1)
  order = np.argsort(values, kind="stable")
  ties = [(a, b) for a, b in zip(order[:-1], order[1:], strict=True)
          if values[b] - values[a] <= rounding][:4]
  references = []
  for swaps in itertools.product((False, True), repeat=len(ties)):
    v = values.copy()
    for (a, b), swap in zip(ties, swaps, strict=True):
      if swap:
        v[a], v[b] = v[b], v[a]
    references.append(numpy_es_gradient(v[0::2], v[1::2], eps, shaping="centered_rank"))
  return references, len(ties)


def agreement(problem, open_es) -> dict[str, Any]:
  """The three agreement checks of one row (evosax ones None without evosax)."""
  params, fitness, n = problem["params"], problem["fitness"], problem["population"]
  key = jax.random.key(7)
  flat, unravel = ravel_pytree(params)
  flat = np.asarray(flat)
  eps = documented_noise(key, n // 2, params)
  members_plus = (flat + np.float32(SIGMA) * eps).astype(np.float32)
  members_minus = (flat + np.float32(-SIGMA) * eps).astype(np.float32)
  evaluate = jax.jit(jax.vmap(lambda m: fitness(unravel(m))))
  plus = np.asarray(evaluate(members_plus), np.float64)
  minus = np.asarray(evaluate(members_minus), np.float64)
  one = jax.jit(lambda m: fitness(unravel(m)))  # each member alone: another float32 order
  rounding = max(abs(float(one(m)) - v) for members, values in (
      (members_plus, plus), (members_minus, minus)) for m, v in zip(members, values, strict=True))
  references, ties = near_tie_references(plus, minus, eps, rounding)
  out: dict[str, Any] = {"fitness_rounding": rounding, "near_ties": ties}
  ours = {}
  for shaping in ("centered_rank", None):
    g = jax.jit(functools.partial(gradtx.es_gradient, fitness, sigma=SIGMA, num_samples=n,
                                  shaping=shaping))(params, key)
    ours[shaping] = np.asarray(ravel_pytree(g)[0], np.float64)
  out["gradtx_vs_numpy"] = min((diff(ours["centered_rank"], r) for r in references),
                               key=lambda d: d["rel"])
  out["gradtx_vs_numpy_raw"] = diff(ours[None], numpy_es_gradient(plus, minus, eps,
                                                                  shaping=None))
  if open_es is None:
    out["gradtx_vs_evosax"] = out["gradtx_vs_evosax_raw"] = out["evosax_vs_numpy"] = None
    return out
  population = np.concatenate([members_plus, members_minus])  # evosax: [z; -z]
  for shaping, label in (("centered_rank", "gradtx_vs_evosax"), (None, "gradtx_vs_evosax_raw")):
    theirs = evosax_gradient(open_es, params, fitness, population,
                             shaping=shaping or "none")
    out[label] = diff(ours[shaping], theirs)
    if shaping == "centered_rank" and ties:  # each matches an admissible reference
      closest = lambda g: min(diff(g, r)["rel"] for r in references)
      out[label] = {**out[label], "rel": max(closest(ours[shaping]), closest(theirs))}
  pop, values, theirs, mean = evosax_own_population(open_es, params, fitness, n,
                                                    jax.random.key(11))
  half = n // 2
  z = (pop[:half] - mean) / SIGMA
  out["evosax_vs_numpy"] = diff(theirs, numpy_es_gradient(values[:half], values[half:], z,
                                                          shaping="centered_rank"))
  return out


# --------------------------------------------------------------------------- speed


def gradtx_generations(problem, *, lean: bool):
  tx = optax.chain(
      gradtx.zeroth_order("es", key=jax.random.key(3), sigma=SIGMA,
                          num_samples=problem["population"], shaping="centered_rank",
                          lean=lean),
      optax.sgd(SPEED_LR))
  fitness = problem["fitness"]

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(p, s, p, loss_fn=fitness)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), None, length=problem["generations"])[0]

  return run, tx.init(problem["params"])


def evosax_generations(problem, open_es):
  es = open_es(population_size=problem["population"], solution=problem["params"],
               optimizer=optax.sgd(SPEED_LR), std_schedule=optax.constant_schedule(SIGMA))
  es_params = es.default_params
  fitness = problem["fitness"]

  @jax.jit
  def run(state, key):
    def body(state, k):
      k_ask, k_tell = jax.random.split(k)
      members, state = es.ask(k_ask, state, es_params)
      state, _ = es.tell(k_tell, members, jax.vmap(fitness)(members), state, es_params)
      return state, None
    return jax.lax.scan(body, state, jax.random.split(key, problem["generations"]))[0]

  return run, es.init(jax.random.key(0), problem["params"], es_params)


def xla_cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", np.nan)),
          "bytes_accessed": float(cost.get("bytes accessed", np.nan))}


def speed_row(problem, open_es, repeats, warmup, bar) -> dict[str, Any]:
  params = problem["params"]
  compiled, costs = {}, {}
  run, state = gradtx_generations(problem, lean=False)
  compiled["gradtx"] = functools.partial(run.lower(params, state).compile(), params, state)
  run, state = gradtx_generations(problem, lean=True)
  compiled["gradtx_lean"] = functools.partial(run.lower(params, state).compile(), params,
                                              state)
  if open_es is not None:
    run, state = evosax_generations(problem, open_es)
    key = jax.random.key(5)
    compiled["evosax"] = functools.partial(run.lower(state, key).compile(), state, key)
  costs = {name: xla_cost(fn.func) for name, fn in compiled.items()}
  times = _common.time_interleaved(compiled, repeats=repeats, warmup=warmup,
                                   seed=problem["population"], on_round=bar.update)
  generations = problem["generations"]
  row = {
      "problem": problem["problem"],
      "num_params": count(params),
      "population": problem["population"],
      "generations_per_call": generations,
      "estimates_per_s": {k: float(generations / np.median(v)) for k, v in times.items()},
      "median_ms_per_estimate": {k: float(np.median(v) / generations * 1e3)
                                 for k, v in times.items()},
      # throughput ratios: other's time / gradtx's time (> 1: gradtx faster)
      "lean_vs_default": _common.paired_ratio(times["gradtx"], times["gradtx_lean"]),
      "vs_evosax": (_common.paired_ratio(times["evosax"], times["gradtx"])
                    if "evosax" in times else None),
      "lean_vs_evosax": (_common.paired_ratio(times["evosax"], times["gradtx_lean"])
                         if "evosax" in times else None),
      "xla_cost": costs,
      "xla_flops_vs_evosax": (costs["gradtx"]["flops"] / costs["evosax"]["flops"]
                              if "evosax" in costs else None),
  }
  row["agreement"] = agreement(problem, open_es)
  checks = [row["agreement"][k] for k in ("gradtx_vs_numpy", "gradtx_vs_evosax",
                                          "evosax_vs_numpy") if row["agreement"][k]]
  row["agreement_target_met"] = bool(all(c["rel"] <= TARGET["agreement_rel"] for c in checks))
  row["speed_target_met"] = (None if row["vs_evosax"] is None else
                             bool(row["vs_evosax"]["median"] >= TARGET["vs_evosax_min"]))
  return row


# -------------------------------------------------------------------------- memory


def compile_memory(fn, *args) -> tuple[Any, dict[str, int]]:
  """The AOT-compiled ``jax.jit(fn)`` and its ``memory_analysis()`` in bytes."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  return compiled, {key: int(getattr(analysis, f"{key}_size_in_bytes"))
                    for key in ("temp", "argument", "output", "generated_code")}


def memory_rows(sizes, data, execute_up_to: int, bar) -> list[dict[str, Any]]:
  x, y = data.x_train[:MEMORY_BATCH], data.y_train[:MEMORY_BATCH]
  loss = lambda p: cross_entropy(p, x, y)
  es = functools.partial(gradtx.es_gradient, loss, sigma=SIGMA,
                         num_samples=MEMORY_POPULATION, shaping="centered_rank")
  modes = {
      "materialised (default)": es,
      f"chunked (batch_size={MEMORY_CHUNK})": functools.partial(es, batch_size=MEMORY_CHUNK),
      "lean": functools.partial(es, lean=True),
      "forward only (context)": lambda p, k: loss(p),
      "backprop (context)": lambda p, k: jax.grad(loss)(p),
  }
  rows = []
  for size in sizes:
    shapes = jax.eval_shape(functools.partial(init_packed, jax.random.key(0), size))
    key = jax.random.key(9)
    executed = count(shapes) <= execute_up_to
    params = init_packed(jax.random.key(0), size) if executed else None
    estimates = {}
    size_rows = []
    for mode, fn in modes.items():
      start = time.perf_counter()
      compiled, memory = compile_memory(fn, shapes, key)
      compile_s = time.perf_counter() - start
      row = {"num_params": count(shapes), "target_params": size,
             "hidden": int(shapes["w"].shape[1]), "population": MEMORY_POPULATION,
             "mode": mode, "memory": memory, "compile_s": compile_s, "executed": executed,
             "max_abs_diff_vs_default": None}
      if executed and "context" not in mode:
        estimates[mode] = np.asarray(compiled(params, key)["w"])
      size_rows.append(row)
      bar.update()
    default = size_rows[0]["memory"]["temp"]
    for row in size_rows:
      row["temp_vs_default"] = row["memory"]["temp"] / default
      if row["mode"] in estimates:
        row["max_abs_diff_vs_default"] = float(np.max(np.abs(
            estimates[row["mode"]] - estimates[size_rows[0]["mode"]])))
    rows += size_rows
  return rows


# ------------------------------------------------------------------------ training


def training(data, *, quick: bool, bar) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                  dict[str, Any]]:
  steps = 40 if quick else TRAIN["steps"]
  eval_every = 10 if quick else TRAIN["eval_every"]
  population = 8 if quick else TRAIN["es_population"]
  config = {
      "model": "linear 64 → 10 (no bias)" if quick else f"MLP 64 → {MLP_HIDDEN} → 10",
      "num_params": None, "steps": steps, "eval_every": eval_every,
      "batch": TRAIN_BATCH,
      "es": {"sigma": TRAIN["es_sigma"], "num_samples": population,
             "shaping": "centered_rank", "optimizer": "adam",
             "learning_rate": TRAIN["es_learning_rate"]},
      "reinforce": {"num_samples": TRAIN_BATCH, "baseline": "mean", "optimizer": "adam",
                    "learning_rate": TRAIN["reinforce_learning_rate"]},
      "backprop": {"optimizer": "adam", "learning_rate": TRAIN["backprop_learning_rate"]},
  }
  params0 = (init_linear(jax.random.key(20)) if quick
             else init_mlp(jax.random.key(20), MLP_HIDDEN))
  config["num_params"] = count(params0)
  x_train, y_train = data.x_train, data.y_train
  x_test, y_test = data.x_test, data.y_test
  rng = np.random.default_rng(21)
  batches = jnp.asarray(np.stack([rng.choice(len(y_train), TRAIN_BATCH, replace=False)
                                  for _ in range(steps)]).reshape(
                                      steps // eval_every, eval_every, TRAIN_BATCH))

  es_tx = optax.chain(
      gradtx.zeroth_order("es", key=jax.random.key(22), sigma=config["es"]["sigma"],
                          num_samples=population, shaping="centered_rank"),
      optax.adam(config["es"]["learning_rate"]))

  def es_step(params, state, idx, step_key):
    del step_key
    xb, yb = x_train[idx], y_train[idx]
    u, state = es_tx.update(params, state, params, loss_fn=lambda p: -accuracy(p, xb, yb))
    return optax.apply_updates(params, u), state

  pg_tx = optax.adam(config["reinforce"]["learning_rate"])

  def pg_step(params, state, idx, step_key):
    xb, yb = x_train[idx], y_train[idx]

    def sample(p, k):  # one image of the batch and a class from the policy
      k_image, k_class = jax.random.split(k)
      i = jax.random.randint(k_image, (), 0, TRAIN_BATCH)
      return i, jax.random.categorical(k_class, logits(p, xb)[i])

    def log_prob(p, sample):
      i, c = sample
      return jax.nn.log_softmax(logits(p, xb))[i, c]

    reward = lambda sample: (sample[1] == yb[sample[0]]).astype(jnp.float32)
    g = gradtx.score_function_gradient(log_prob, reward, params, step_key, sample_fn=sample,
                                       num_samples=TRAIN_BATCH, baseline="mean")
    u, state = pg_tx.update(jax.tree.map(jnp.negative, g), state, params)  # ascend E r
    return optax.apply_updates(params, u), state

  bp_tx = optax.adam(config["backprop"]["learning_rate"])

  def bp_step(params, state, idx, step_key):
    del step_key
    g = jax.grad(cross_entropy)(params, x_train[idx], y_train[idx])
    u, state = bp_tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  methods = {
      "ES on accuracy": (es_step, es_tx, population),
      "REINFORCE on accuracy": (pg_step, pg_tx, 1),
      "backprop on cross-entropy": (bp_step, bp_tx, 1),
  }
  rows, curves = [], {}
  for method, (step, tx, evals_per_step) in methods.items():

    @jax.jit
    def chunk(params, state, idx_chunk, chunk_key, step=step):
      def body(carry, inputs):
        p, s = carry
        idx, k = inputs
        return step(p, s, idx, k), None
      keys = jax.random.split(chunk_key, idx_chunk.shape[0])
      (params, state), _ = jax.lax.scan(body, (params, state), (idx_chunk, keys))
      return params, state, accuracy(params, x_test, y_test), accuracy(params, x_train,
                                                                        y_train)

    params, state = params0, tx.init(params0)
    test_acc = [float(accuracy(params0, x_test, y_test))]
    train_acc = [float(accuracy(params0, x_train, y_train))]
    start = time.perf_counter()
    for c in range(batches.shape[0]):
      params, state, te, tr = chunk(params, state, batches[c], jax.random.key(1000 + c))
      test_acc.append(float(te))
      train_acc.append(float(tr))
      bar.update()
    wall_s = time.perf_counter() - start
    step_axis = [c * eval_every for c in range(len(test_acc))]
    evaluations = [s * evals_per_step for s in step_axis]
    curves[method] = {"steps": step_axis, "evaluations": evaluations,
                      "test_accuracy": test_acc, "train_accuracy": train_acc}
    reach = {}
    for level in (0.8, 0.9):
      hit = next((e for e, a in zip(evaluations, test_acc, strict=True) if a >= level), None)
      reach[f"{level:.1f}"] = hit
    rows.append({
        "method": method, "evaluations_per_step": evals_per_step,
        "backward_passes_per_step": 0 if method.startswith("ES") else 1,
        "steps": steps, "total_evaluations": steps * evals_per_step,
        "final_test_accuracy": test_acc[-1], "best_test_accuracy": max(test_acc),
        "final_train_accuracy": train_acc[-1], "evaluations_to_test_accuracy": reach,
        "wall_s": wall_s,
    })
  return rows, curves, config


# ------------------------------------------------------------------------- reporting


def _fmt_diff(d) -> str:
  return "—" if d is None else f"{d['max_abs']:.1e} ({d['rel']:.1e})"


def _fmt_bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def plot(rows, memory, curves, out_dir, evosax_available: bool):
  plt = _common.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(13, 9))
  ax = axes[0, 0]
  labels = [f"{r['problem']}\nN={r['population']}" for r in rows]
  y = np.arange(len(rows))
  key = "vs_evosax" if evosax_available else "lean_vs_default"
  med = np.array([r[key]["median"] for r in rows])
  lo = np.array([r[key]["ci_low"] for r in rows])
  hi = np.array([r[key]["ci_high"] for r in rows])
  ax.barh(y, med - 1.0, left=1.0, xerr=[med - lo, hi - med], color="tab:blue", alpha=0.7,
          capsize=3)
  ax.axvline(1.0, color="black", lw=1)
  if evosax_available:
    ax.axvline(TARGET["vs_evosax_min"], color="tab:red", ls="--", lw=1, label="target ≥ 1")
    ax.legend(loc="lower right")
  ax.set_xlim(min(0.9, float(lo.min()) - 0.05), max(1.1, float(hi.max()) + 0.05))
  ax.set_yticks(y, labels)
  ax.set_xlabel("throughput ratio (median over rounds; bars: 95% CI)")
  ax.set_title("gradtx / evosax Open_ES estimates per second" if evosax_available
               else "gradtx default / lean estimates per second (evosax not installed)")

  ax = axes[0, 1]
  modes = list(dict.fromkeys(r["mode"] for r in memory))
  sizes = list(dict.fromkeys(r["num_params"] for r in memory))
  width = 0.8 / len(modes)
  for i, mode in enumerate(modes):
    values = [next(r["memory"]["temp"] for r in memory
                   if r["mode"] == mode and r["num_params"] == s) for s in sizes]
    ax.bar(np.arange(len(sizes)) + i * width, np.maximum(values, 1), width, label=mode)
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(sizes)) + width * (len(modes) - 1) / 2,
                [f"{s:.2g} params" for s in sizes])
  ax.set_ylabel("compiled temporaries (bytes)")
  ax.set_title(f"memory of one ES estimate, N = {MEMORY_POPULATION}")
  ax.legend(fontsize=8)

  for ax, xkey, xlabel in ((axes[1, 0], "evaluations", "forward passes over the batch"),
                           (axes[1, 1], "steps", "optimizer steps")):
    for method, curve in curves.items():
      xs, acc = np.asarray(curve[xkey], float), np.asarray(curve["test_accuracy"])
      if xkey == "evaluations":  # log axis: the step-0 point (no evaluations) is left out
        xs, acc = xs[1:], acc[1:]
      ax.plot(xs, acc, marker=".", label=method)
    if xkey == "evaluations":
      ax.set_xscale("log")
      first = next(iter(curves.values()))["test_accuracy"][0]
      ax.axhline(first, color="gray", ls=":", lw=1, label="at initialisation")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
  axes[1, 0].set_title("digits: test accuracy vs function evaluations")
  axes[1, 1].set_title("digits: test accuracy vs steps")
  fig.tight_layout()
  _common.save_figure(fig, out_dir, NAME)


def main():
  args = _common.parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
      "--no-evosax", action="store_true",
      help="skip the evosax comparison even when evosax is installed"))
  wall_start = time.perf_counter()
  load_average = {"start": os.getloadavg()[0]}
  open_es, evosax_info = load_evosax(args.no_evosax)
  repeats, warmup = (3, 1) if args.quick else (20, 2)
  data = load_digits()

  problems = speed_problems(args.quick, data)
  memory_sizes = [10_000] if args.quick else [1_000_000, 10_000_000]
  execute_up_to = 20_000 if args.quick else 2_000_000
  train_chunks = 4 if args.quick else TRAIN["steps"] // TRAIN["eval_every"]
  total = (len(problems) * (repeats + warmup) + len(memory_sizes) * 5 + 3 * train_chunks)
  with tqdm(total=total, desc=NAME, unit="step") as bar:
    rows = [speed_row(p, open_es, repeats, warmup, bar) for p in problems]
    memory = memory_rows(memory_sizes, data, execute_up_to, bar)
    train_rows, curves, train_config = training(data, quick=args.quick, bar=bar)
  load_average["end"] = os.getloadavg()[0]

  speed_table = _common.markdown_table(
      ["function", "params", "N", "gradtx est/s", "evosax est/s", "gradtx / evosax", "95% CI",
       "lean / evosax", "lean / default", "XLA FLOPs gradtx / evosax", "gradtx vs numpy",
       "gradtx vs evosax (same noise)", "raw fitness", "evosax vs numpy"],
      [[r["problem"], f"{r['num_params']:,}", r["population"],
        f"{r['estimates_per_s']['gradtx']:.0f}",
        f"{r['estimates_per_s']['evosax']:.0f}" if "evosax" in r["estimates_per_s"] else "—",
        _common.fmt_ratio(r["vs_evosax"], 2), _common.fmt_ci(r["vs_evosax"], 2),
        _common.fmt_ratio(r["lean_vs_evosax"], 2),
        _common.fmt_ratio(r["lean_vs_default"], 2),
        "—" if r["xla_flops_vs_evosax"] is None else f"{r['xla_flops_vs_evosax']:.2f}",
        _fmt_diff(r["agreement"]["gradtx_vs_numpy"]),
        _fmt_diff(r["agreement"]["gradtx_vs_evosax"]),
        _fmt_diff(r["agreement"]["gradtx_vs_evosax_raw"]),
        _fmt_diff(r["agreement"]["evosax_vs_numpy"])] for r in rows])
  memory_table = _common.markdown_table(
      ["params", "mode", "temp", "temp / default", "arguments", "outputs", "executed",
       "max \\|Δĝ\\| vs default"],
      [[f"{r['num_params']:,}", r["mode"], _fmt_bytes(r["memory"]["temp"]),
        f"{r['temp_vs_default']:.4f}", _fmt_bytes(r["memory"]["argument"]),
        _fmt_bytes(r["memory"]["output"]), "yes" if r["executed"] else "compile only",
        "—" if r["max_abs_diff_vs_default"] is None else f"{r['max_abs_diff_vs_default']:.1e}"]
       for r in memory])
  train_table = _common.markdown_table(
      ["method", "forward passes / step", "backward / step", "steps", "forward passes",
       "final test acc", "best test acc", "final train acc", "passes to 80% test",
       "passes to 90% test", "wall s"],
      [[r["method"], r["evaluations_per_step"], r["backward_passes_per_step"], r["steps"],
        f"{r['total_evaluations']:,}", f"{r['final_test_accuracy']:.3f}",
        f"{r['best_test_accuracy']:.3f}", f"{r['final_train_accuracy']:.3f}",
        *[("never" if r["evaluations_to_test_accuracy"][k] is None
           else f"{r['evaluations_to_test_accuracy'][k]:,}") for k in ("0.8", "0.9")],
        f"{r['wall_s']:.1f}"] for r in train_rows])

  quick = " (quick)" if args.quick else ""
  if evosax_info["available"]:
    met = [r for r in rows if r["speed_target_met"]]
    speed_line = (f"evosax {evosax_info['evosax']}: gradtx at least as fast in "
                  f"{len(met)}/{len(rows)} rows — target "
                  f"{'met' if len(met) == len(rows) else 'NOT met'} (gradtx / evosax "
                  f"{min(r['vs_evosax']['median'] for r in rows):.2f}–"
                  f"{max(r['vs_evosax']['median'] for r in rows):.2f}).")
  else:
    speed_line = f"evosax not compared: {evosax_info['note']}."
  worst = max(max(d["rel"] for d in (r["agreement"][k] for k in (
      "gradtx_vs_numpy", "gradtx_vs_evosax", "evosax_vs_numpy")) if d) for r in rows)
  ties = [r for r in rows if r["agreement"].get("near_ties")]
  tie_note = "".join(
      f" {r['problem']} (N = {r['population']}): {r['agreement']['near_ties']} pair(s) of "
      f"members whose float32 fitness differ by less than its rounding between two "
      f"evaluation orders ({r['agreement']['fitness_rounding']:.1e}), so their rank order "
      f"is not determined; gradtx and evosax are each compared with the closest of the "
      f"references for either order (the same-noise column's max |Δĝ| is their direct "
      f"difference)."
      for r in ties)
  agree_line = (f"Agreement (centered ranks): largest relative difference {worst:.1e} — "
                f"target ≤ {TARGET['agreement_rel']:g} "
                f"{'met' if worst <= TARGET['agreement_rel'] else 'NOT met'}.{tie_note}")
  big = [r for r in memory if r["num_params"] == max(x["num_params"] for x in memory)]
  lean_big = next(r for r in big if r["mode"] == "lean")
  memory_line = (f"At {lean_big['num_params']:,} parameters lean needs "
                 f"{lean_big['temp_vs_default']:.3f}× the default's temporaries "
                 f"({_fmt_bytes(lean_big['memory']['temp'])} vs "
                 f"{_fmt_bytes(big[0]['memory']['temp'])}).")
  markdown = "\n".join([
      f"# Zeroth-order gradients: speed vs evosax, lean memory, digits training{quick}",
      "",
      f"CPU ({_common.environment()['cpu_count']} cores, shared; 1-min load average "
      f"{load_average['start']:.1f} at the start, {load_average['end']:.1f} at the end). "
      f"OpenAI ES, σ = {SIGMA}, antithetic, centered-rank shaping, one SGD step per "
      "estimate; est/s: gradient estimates per second (median); ratios: medians over "
      f"{repeats} interleaved rounds of same-round throughput ratios (> 1: gradtx faster), "
      "95% CI by bootstrap. Agreement columns: max |Δĝ| (relative to max |ĝ|); "
      "*same noise*: gradtx's noise fed to evosax as its population; *evosax vs numpy*: "
      "evosax's own population through the documented gradtx formula in float64.",
      "",
      speed_table,
      "",
      speed_line + " " + agree_line,
      "",
      f"## Memory of one estimate (N = {MEMORY_POPULATION}, bias-free MLP 64 → H → 10 in "
      f"one leaf, batch {MEMORY_BATCH})",
      "",
      "`memory_analysis()` of the compiled estimate (temporaries exclude arguments and "
      "outputs); the context rows are one forward pass and one backprop gradient.",
      "",
      memory_table,
      "",
      memory_line,
      "",
      f"## Training on digits: accuracy as the objective ({train_config['model']}, "
      f"{train_config['num_params']:,} parameters)",
      "",
      f"Batch {TRAIN_BATCH}; ES: N = {train_config['es']['num_samples']}, "
      f"σ = {train_config['es']['sigma']}, "
      f"adam {train_config['es']['learning_rate']}; REINFORCE: one (image, class) sample "
      f"per batch image, leave-one-out baseline, adam "
      f"{train_config['reinforce']['learning_rate']}; backprop: cross-entropy, adam "
      f"{train_config['backprop']['learning_rate']}. Forward passes count the model over "
      "the training batch (ES: N per step; REINFORCE and backprop: 1 per step plus one "
      "backward pass).",
      "",
      train_table,
  ])
  wall_s = time.perf_counter() - wall_start
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": args.quick,
      "config": {"sigma": SIGMA, "speed_learning_rate": SPEED_LR, "repeats": repeats,
                 "warmup": warmup, "memory_population": MEMORY_POPULATION,
                 "memory_batch": MEMORY_BATCH, "memory_chunk": MEMORY_CHUNK},
      "target": TARGET,
      "evosax": evosax_info,
      "load_average": load_average,
      "wall_s": wall_s,
      "rows": rows,
      "memory": {"population": MEMORY_POPULATION, "rows": memory},
      "training": {"config": train_config, "rows": train_rows, "curves": curves},
  })
  plot(rows, memory, curves, args.out, evosax_info["available"])


if __name__ == "__main__":
  main()
