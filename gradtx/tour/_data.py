"""The tour's data and model: standardised ``load_digits`` and a small named MLP."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Dataset(NamedTuple):
  """Standardised digits: float32 images (n, 64) and int32 labels, split in two."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


def _split(test_size: float, seed: int) -> tuple[np.ndarray, ...]:
  """``load_digits`` (intensities 0..16) split stratified: x_train, x_test, y_train, y_test."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  return tuple(train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y))


def load_data(*, test_size: float = 0.3, seed: int = 0) -> Dataset:
  """``sklearn.datasets.load_digits``, a fixed stratified split, standardised per pixel.

  Mean and standard deviation come from the training split only; pixels that are
  constant there (the image border) are centred and left unscaled.
  """
  x_train, x_test, y_train, y_test = _split(test_size, seed)
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  as_x = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
  as_y = lambda a: jnp.asarray(a, jnp.int32)
  return Dataset(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def raw_digits(data: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``data``'s split as raw intensities in [0, 1] (float64): x_train, y_train, x_test, y_test.

  For the parts that want pixels unscaled (K-means, image augmentations). The split is
  :func:`load_data`'s default; the labels are checked against ``data``.
  """
  x_train, x_test, y_train, y_test = _split(0.3, 0)
  if not (np.array_equal(y_train, np.asarray(data.y_train))
          and np.array_equal(y_test, np.asarray(data.y_test))):
    raise RuntimeError("the digits split no longer matches gradtx.tour.load_data's default")
  return x_train / 16.0, y_train, x_test / 16.0, y_test


class MLP(nn.Module):
  """``embed`` → ``layer_0 … layer_{L-1}`` → ``head``: ReLU Dense layers named by depth.

  The names make the parameter paths (``params/layer_1/kernel``) that the path rules of
  :func:`gradtx.layerwise_lr_decay` and :func:`gradtx.scale_by_path` match.
  """

  width: int = 64
  num_layers: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.width, name="embed")(x))
    for i in range(self.num_layers):
      x = nn.relu(nn.Dense(self.width, name=f"layer_{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


#: Depth rules for :class:`MLP` with ``num_layers=3`` (embed 0, layer_i i+1, head 4).
MLP_DEPTH_RULES = {"params/embed/.*": 0, r"params/layer_(\d+)/.*": 1, "params/head/.*": 4}
