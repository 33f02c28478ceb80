"""Part ``em``: K-means on the digits, where Lloyd's EM step is a diagonal Newton step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import raw_digits
from gradtx.tour._registry import Column, Context, PartResult, Row, part
from gradtx.tour._report import Figure, Panel, direction
from gradtx.tour._training import run_compiled

_K = 10
_FLOOR = 1e-18  # where the figure draws an exact 0 on its log scale


def _iterations(quick: bool) -> int:
  return 10 if quick else 30


_EM_ABOUT = f"""
Su (kexue.fm/archives/4277): gradient descent, Newton and EM all minimise a local model
of the loss. For K-means, `L(c) = Σ_ij C_ij ‖x_i − c_j‖²` with the assignments `C` held
fixed (the E-step) has the diagonal Hessian `2 Σ_i C_ij` per centroid, so the Newton step
is Lloyd's M-step `c_j ← Σ_i C_ij x_i / Σ_i C_ij`. Setting: the tour's training images
as raw pixel intensities in [0, 1] (64 pixels; unstandardised, as K-means wants), k = {_K},
the same {_K} random training images as initial centroids, {_iterations(True)} iterations
(`--quick`) or {_iterations(False)}, in float64 (`jax.enable_x64`). Rows: Lloyd's
algorithm in numpy (the reference); `gradtx.diag_newton(1.0, damping=0.0, key=...)` on
the K-means loss with the nearest-centroid assignments under `jax.lax.stop_gradient`, its
curvature from the `loss_fn` passed to `update` (Hutchinson's estimator, exact for a
diagonal Hessian); `optax.sgd` with one step size for every centroid (half of Newton's
step for a cluster of average size). "K-means loss / image" is the mean squared distance
of a training image to its nearest final centroid; "cluster acc" labels each test image
by the majority training label of its nearest centroid (unsupervised rows, not marked
clean); "max |Δ Lloyd|" is the largest difference from Lloyd's centroids over all
iterations; "last K-means loss" is the summed loss at the last iteration.
"""


def _lloyd(x: np.ndarray, centroids: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's algorithm in numpy: centroid path ``[iters + 1, K, D]`` and losses ``[iters]``."""
  path, losses = [centroids], []
  for _ in range(iters):
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    losses.append(d2[np.arange(len(x)), nearest].sum())
    centroids = np.stack([x[nearest == j].mean(0) if np.any(nearest == j) else centroids[j]
                          for j in range(len(centroids))])
    path.append(centroids)
  return np.stack(path), np.asarray(losses)


def _gradtx_path(tx: optax.GradientTransformation, x: np.ndarray, centroids: np.ndarray,
                 iters: int) -> tuple[np.ndarray, np.ndarray]:
  """The same iterations with ``tx`` on the K-means loss, in one compiled float64 scan."""

  def run(x, c0):
    def loss_fn(c):
      d2 = jnp.sum((x[:, None, :] - c[None]) ** 2, -1)
      assign = jax.nn.one_hot(jnp.argmin(d2, axis=1), c.shape[0], dtype=d2.dtype)
      return jnp.sum(jax.lax.stop_gradient(assign) * d2)  # the E-step: assignments fixed

    def step(carry, _):
      c, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(c)
      updates, state = tx.update(grads, state, c, loss_fn=loss_fn)
      c = optax.apply_updates(c, updates)
      return (c, state), (c, loss)

    _, (path, losses) = jax.lax.scan(step, (c0, tx.init(c0)), None, iters)
    return jnp.concatenate([c0[None], path]), losses

  with jax.enable_x64(True):
    path, losses = run_compiled(run, jnp.asarray(x, jnp.float64),
                                jnp.asarray(centroids, jnp.float64))
    return np.asarray(path), np.asarray(losses)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  return ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def _cluster_accuracy(centroids: np.ndarray, x: np.ndarray, y: np.ndarray,
                      x_test: np.ndarray, y_test: np.ndarray) -> float:
  """Test accuracy of labelling each cluster by its majority training label."""
  if not np.all(np.isfinite(centroids)):
    return float("nan")
  train_cluster = _nearest(x, centroids)
  labels = np.array([np.bincount(y[train_cluster == j], minlength=10).argmax()
                     if np.any(train_cluster == j) else -1 for j in range(len(centroids))])
  return float(np.mean(labels[_nearest(x_test, centroids)] == y_test))


def _tile(centroids: np.ndarray, per_row: int = 5) -> np.ndarray:
  """The centroids as 8×8 images in rows of ``per_row``, blank (NaN) between them."""
  tiles = [c.reshape(8, 8) for c in centroids]
  tiles += [np.full((8, 8), np.nan)] * (-len(tiles) % per_row)
  rows = []
  for i in range(0, len(tiles), per_row):
    row = [t for tile in tiles[i:i + per_row] for t in (tile, np.full((8, 1), np.nan))][:-1]
    rows += [np.concatenate(row, axis=1), np.full((1, per_row * 9 - 1), np.nan)]
  return np.concatenate(rows[:-1], axis=0)


@part("em", "Gradient descent and EM: K-means by diagonal Newton steps", _EM_ABOUT)
def _em(ctx: Context) -> PartResult:
  iters = _iterations(ctx.config.quick)
  x, y, x_test, y_test = raw_digits(ctx.data)
  init = x[np.random.default_rng(0).choice(len(x), _K, replace=False)]
  eta_gd = 0.5 / (2 * len(x) / _K)

  lloyd_path, lloyd_loss = _lloyd(x, init, iters)
  runs = {"Lloyd (numpy reference)": (lloyd_path, lloyd_loss)}
  txs = {
      "diag_newton (K-means, assignments under stop_gradient)":
          gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0)),
      f"optax.sgd({eta_gd:.1e}), one step size": optax.sgd(eta_gd),
  }
  for name in ctx.track(list(txs)):
    runs[name] = _gradtx_path(txs[name], x, init, iters)

  rows, diffs = [], {}
  for name, (path, losses) in runs.items():
    diffs[name] = np.abs(path - lloyd_path).max(axis=(1, 2))[1:]
    final = path[-1]
    d2 = ((x[:, None, :] - final[None]) ** 2).sum(-1).min(1)
    rows.append(Row(name, f"k={_K}, {iters} iterations, float64", {
        "kmeans_loss": float(d2.mean()),
        "cluster_acc": _cluster_accuracy(final, x, y, x_test, y_test),
        "max_diff_lloyd": float(diffs[name].max()),
        "last_loss": float(losses[-1])}, clean=False, chance=None))

  newton = next(name for name in runs if name.startswith("diag_newton"))
  its = np.arange(1, iters + 1)
  eps = np.finfo(np.float64).eps * np.abs(lloyd_path).max()
  figure = Figure("em", "K-means on the digits: Lloyd's algorithm and diagonal Newton steps "
                  "are one algorithm", [
      Panel("K-means loss before each iteration (Lloyd's under diag_newton's)",
            {n: loss for n, (_, loss) in runs.items()}, x=its, xlabel="iteration"),
      Panel(f"max |centroids − Lloyd's| (0 drawn at {_FLOOR:g})",
            {newton: np.maximum(diffs[newton], _FLOOR),
             "float64 eps × max |c|": np.full(iters, eps)},
            ylabel="max abs difference", x=its, xlabel="iteration"),
      Panel("diag_newton's centroids (pixel intensity)", {},
            image=_tile(runs[newton][0][-1]), xlabel="", ylabel=""),
  ])
  gd = next(name for name in runs if name.startswith("optax.sgd"))
  gap, rounding = diffs[newton].max(), 1e3 * eps
  columns = [Column("kmeans_loss", "K-means loss / image", ".4g"),
             Column("cluster_acc", "cluster acc", ".3f"),
             Column("max_diff_lloyd", "max |Δ Lloyd|", ".1e"),
             Column("last_loss", "last K-means loss", ".6g")]
  lines = [
      f"- Over {iters} iterations, diag_newton's centroids differ from Lloyd's by at most "
      f"{gap:.1e}: {'within' if gap <= rounding else 'beyond'} float64 rounding (1000 × "
      f"eps × max |c| = {rounding:.1e}); the losses agree to "
      f"{np.abs(runs[newton][1] - lloyd_loss).max() / lloyd_loss[-1]:.1e} (relative).",
      f"- One step size for every centroid (gradient descent) ends at K-means loss "
      f"{runs[gd][1][-1]:.6g}, {direction(runs[gd][1][-1], lloyd_loss[-1])} than Lloyd's "
      f"{lloyd_loss[-1]:.6g}, and {diffs[gd].max():.1e} from Lloyd's centroids: the "
      "per-centroid curvature `2 n_j` is what makes Newton's step Lloyd's.",
  ]
  return PartResult(columns, rows, [figure], lines)
