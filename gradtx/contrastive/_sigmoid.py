r"""SigLIP's sigmoid pairwise loss: every pair is its own binary classification.

With ``s_ij = <a_i, b_j> / τ + β`` and ``z_ij = +1`` for a positive pair, ``−1`` otherwise,

.. math::
  L = -\frac{1}{B} \sum_{i=1}^{B} \sum_{j=1}^{B} \log \sigma(z_{ij} s_{ij}).

No softmax, so no normaliser over a row or a column: the loss is a plain sum over the
pairs, which tiles (``block_size=``) and shards (``axis_name=``, a ring of devices)
without a streaming log-sum-exp. The tiling code is InfoNCE's (``_blockwise.py``, the
:class:`~gradtx.contrastive._blockwise.Sigmoid` kernel).

References:
  Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid loss for language image pre-training"
  (SigLIP), 2023, arXiv:2303.15343.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from gradtx import _checks
from gradtx.contrastive import _blockwise, _losses


def _dense(a, b, labels, inv_t, bias):
  s = (a @ b.T) * inv_t + bias
  z = jnp.where(labels[:, None] == labels[None, :], 1.0, -1.0).astype(s.dtype)
  return -jnp.sum(jax.nn.log_sigmoid(z * s)) / a.shape[0]


def sigmoid_contrastive(
    a: jax.Array,
    b: jax.Array,
    *,
    temperature: chex.Numeric,
    bias: chex.Numeric,
    labels: jax.Array | None = None,
    normalize: bool = True,
    block_size: int | None = None,
    axis_name: str | None = None,
) -> jax.Array:
  r"""SigLIP's sigmoid loss between two towers, dense, tiled or as a ring of devices.

  .. math::
    L = -\frac{1}{B} \sum_{i, j} \log \sigma\big(z_{ij} (\langle a_i, b_j \rangle / \tau
      + \beta)\big), \qquad z_{ij} = \begin{cases} +1 & j \in P(i) \\ -1 & \text{else}
      \end{cases}

  ``P(i) = {i}`` (the diagonal), or the rows of ``b`` with ``a_i``'s label. The sum runs
  over all ``B²`` pairs but is divided by ``B``, not ``B²``, as in the paper's
  pseudo-code and big_vision's trainer (``nll = −Σ_j log σ``, then the mean over the
  rows): each image's ``B`` binary terms are summed, so the gradient does not shrink as
  the batch grows, and a learning rate tuned at one batch size carries over.

  The paper's parametrisation is ``logits = t · <a_i, b_j> + β`` with ``t = exp(t')``,
  ``t'`` and ``β`` learnable and initialised to ``t' = log 10`` and ``β = −10`` (the
  strong negative bias keeps the initial loss from being dominated by the ``B² − B``
  negatives). Here ``τ = 1/t``: pass ``temperature=jnp.exp(-t_prime)`` and
  ``bias=beta`` with ``t_prime = jnp.log(10.0)``, ``beta = -10.0`` at initialisation;
  both get their gradients (through the custom VJP too).

  Args:
    a: (B, d) representations of the first tower (images).
    b: (B, d) representations of the second tower (texts), paired row by row.
    temperature: τ > 0, a Python float or a (learnable) scalar array; a traced τ ≤ 0
      gives a NaN loss.
    bias: β, a Python float or a (learnable) scalar array.
    labels: optional (B,) integer labels: positives are all pairs with equal labels.
    normalize: L2-normalise the rows first (cosine similarities), as SigLIP does.
    block_size: compute the loss and its gradient in tiles of this many rows and
      columns (a static int, custom VJP, no B × B array); ``None`` = dense.
    axis_name: the mesh axis that shards the batch, to call the loss inside
      ``jax.shard_map``: each device passes its own rows (and labels) and gets the loss
      of the whole batch (``B`` the global batch), the ``b`` blocks travelling the ring
      with ``lax.ppermute`` (``n − 1`` hops, forward and backward); ``None``: one device.

  Returns:
    The scalar loss, float32 (float64 for float64 inputs).

  Raises:
    TypeError: ``temperature`` or ``bias`` is None, a string or a schedule;
      ``block_size`` not a static int; ``normalize`` not a bool; complex
      representations; ``axis_name`` not a str.
    ValueError: a concrete ``temperature`` ≤ 0 or non-finite, ``temperature`` or
      ``bias`` not a scalar, a non-finite ``bias``; ``block_size`` < 1; ``a`` and ``b``
      not (B, d) arrays of the same shape (local batches of different sizes under
      ``shard_map``); bad ``labels``; ``axis_name`` not bound by an enclosing
      ``shard_map``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> a = jnp.eye(2)  # orthogonal pairs: s = 1 on the diagonal, 0 elsewhere (β = 0)
    >>> loss = gradtx.sigmoid_contrastive(a, a, temperature=1.0, bias=0.0)
    >>> round(float(loss), 4)  # (2 softplus(-1) + 2 softplus(0)) / 2
    1.0064

  References:
    Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid loss for language image pre-training",
    2023, arXiv:2303.15343.
  """
  _losses._check_pair("a", a, "b", b, axis_name)
  _losses._check_common(temperature, block_size, axis_name)
  _checks.check_finite("bias", bias, allow_schedule=False)
  _checks.check_bool("normalize", normalize)
  labels = _losses._labels_or_ids(labels, a.shape[0], axis_name)
  if normalize:
    a, b = _losses.l2_normalize(a), _losses.l2_normalize(b)
  dtype = _losses._compute_dtype(a, b)
  a, b = a.astype(dtype), b.astype(dtype)
  inv_t = _losses._inverse_temperature(temperature, dtype)
  bias = jnp.asarray(bias, dtype)
  if block_size is None and axis_name is None:
    return _dense(a, b, labels, inv_t, bias)
  rows, counted = _blockwise.tiled_row_losses(
      _blockwise.Sigmoid, a, b, labels, labels, inv_t, bias, exclude_self=False,
      block_size=block_size, axis_name=axis_name)
  return _losses._mean_over_anchors(rows, counted, axis_name)
