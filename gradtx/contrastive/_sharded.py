"""The two-pass contrastive gradient with the batch sharded over a device mesh.

Each device holds ``B / n`` rows of the batch. A contrastive loss needs *global*
negatives, so the devices exchange their samples' **representations** (``B × d``
values), never their activations: every device encodes only its own rows, chunk by
chunk, the representations are all-gathered, and each device computes the loss and
``G = ∂L/∂h`` on the whole batch. It then pulls only its own rows of ``G`` back through
its own chunks, and the encoder gradients are summed over the devices:

.. math::
  \\nabla_\\theta L = \\sum_{d=1}^{n} \\sum_{i \\in \\mathrm{rows}(d)}
  \\Big(\\frac{\\partial h_i}{\\partial \\theta}\\Big)^{\\!\\top} G_i
  + \\frac{\\partial L}{\\partial \\theta}\\Big|_{h}

The last term (loss-side parameters, e.g. a learnable temperature) is the same on every
device and is added once, after the sum. See ``_cached.py`` for the single-device
algorithm; this module runs its passes (``_cached.encode_chunks``, ``_cached.pull_back``)
inside ``jax.shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradtx import _checks
from gradtx.contrastive import _cached

_LOSS_COMMS = ("all_gather", "ring")


def _check_batch(batch: int, num_devices: int, batch_axis: str, chunk_size: int,
                 with_rng: bool) -> int:
  """The local batch size, or a clear error when the batch does not shard as required."""
  if batch % num_devices:
    raise ValueError(
        f"the batch (axis 0 of inputs) has {batch} rows, which is not divisible by the "
        f"{num_devices} devices of mesh axis {batch_axis!r}; pad or trim the batch to a "
        f"multiple of {num_devices}"
    )
  local = batch // num_devices
  if with_rng and local % chunk_size:
    raise ValueError(
        f"with rng, the local batch ({batch} rows / {num_devices} devices = {local}) must be "
        f"divisible by chunk_size={chunk_size}, so that the chunks (and their dropout keys "
        f"fold_in(rng, chunk_index)) are those of the single-device computation"
    )
  return local


def _check_mesh(mesh: object, batch_axis: object) -> jax.sharding.Mesh:
  """``mesh``, a ``jax.sharding.Mesh`` with the axis ``batch_axis``, or a clear error."""
  if mesh is None:
    raise TypeError(
        "sharded_cached_value_and_grad needs mesh=, the device mesh whose axis batch_axis "
        "shards the batch, e.g. mesh=jax.make_mesh((jax.device_count(),), ('data',)); on "
        "one device, use cached_value_and_grad"
    )
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((n,), ('data',))), "
                    f"got {type(mesh).__name__} {mesh!r}")
  if batch_axis not in mesh.axis_names:
    raise ValueError(
        f"batch_axis must be an axis of the mesh, one of {tuple(mesh.axis_names)}, got "
        f"{batch_axis!r}"
    )
  return mesh


def _check_ring_loss(loss: Callable, params, local_reps, batch_axis: str) -> None:
  """With ``loss_comm="ring"``, ``loss`` must reduce over ``batch_axis`` (traced only)."""
  text = str(jax.make_jaxpr(loss)(params, local_reps))
  if "ppermute" not in text and "psum" not in text:
    raise ValueError(
        f"with loss_comm='ring', loss_fn gets only this device's rows of the "
        f"representations and must compute the global loss with a ring loss, e.g. "
        f"gradtx.info_nce(h['a'], h['b'], temperature=..., axis_name={batch_axis!r}); this "
        f"loss_fn communicates nothing over {batch_axis!r} (axis_name= forgotten?), so it "
        f"would be the loss of each device's rows alone"
    )


def sharded_cached_value_and_grad(
    encode_fn: Callable,
    loss_fn: Callable,
    *,
    mesh: jax.sharding.Mesh | None = None,
    chunk_size: int,
    batch_axis: str = "data",
    has_aux: bool = False,
    loss_comm: str = "all_gather",
) -> Callable:
  r""":func:`cached_value_and_grad` with the batch sharded over mesh axis ``batch_axis``.

  The returned ``f(params, inputs, *, rng=None)`` computes the same loss and gradient as
  the single-device ``cached_value_and_grad(encode_fn, loss_fn, chunk_size=chunk_size)``
  (so exactly ``jax.value_and_grad`` of the loss of the whole batch) with ``inputs``
  sharded along axis 0 over the ``n`` devices of ``batch_axis`` and ``params``
  replicated. Inside ``jax.shard_map``, device ``d``:

  1. encodes only its own ``B / n`` rows, chunk by chunk, without gradients; its local
     chunk ``j`` is global chunk ``d · (B / n) / chunk_size + j`` and gets the key
     ``fold_in(rng, that index)``, as on one device;
  2. all-gathers the representations (tiled along axis 0), so negatives are global;
  3. computes ``L, G = ∂L/∂h`` and the loss-side gradient on the whole batch
     (:func:`representation_grad`) — redundantly, identically on every device;
  4. re-encodes its chunks with the same keys and pulls its rows of ``G`` back (vjp);
  5. ``psum``\ s the encoder gradients over ``batch_axis`` and adds the loss-side
     gradient once (it is not summed: it would count ``n`` times).

  .. math::
    \nabla_\theta L = \operatorname{psum}_d \Big[\sum_{i \in \mathrm{rows}(d)}
    \Big(\frac{\partial h_i}{\partial \theta}\Big)^{\!\top} G_i\Big]
    + \frac{\partial L}{\partial \theta}\Big|_{h}

  With ``loss_comm="ring"``, steps 2–3 become one: ``loss_fn`` gets only this device's
  rows of the representations (and of ``loss_inputs``) and must compute the *global*
  loss with the ring losses (``info_nce``, ``nt_xent``, ``supervised_contrastive`` or
  ``sigmoid_contrastive`` with ``axis_name=batch_axis``): each device does the loss work
  of its own rows only (``O(B² d / n)`` FLOPs instead of ``O(B² d)``), the ``B × d``
  representations are never gathered (the blocks travel the ring by ``ppermute``), and
  ``G`` comes out already split by rows. Everything else in ``loss_fn`` must be the same
  on every device (parameter terms, constants); ``aux`` is device 0's.

  Communication per step, with ``B`` the global batch, ``d`` the width of a
  representation leaf and ``|θ|`` the number of parameters: one all-gather of the
  ``B × d`` representations (each device receives ``(n − 1)/n · B · d`` values per
  representation leaf) and one psum of ``|θ|`` gradient values (a ring all-reduce moves
  about ``2 (n − 1)/n · |θ|`` values per device). Nothing crosses devices in the
  backward of the loss, since every device has all of ``G``. The loss is computed
  redundantly on each device: ``O(B² d)`` FLOPs each, and the ``B × B`` similarities in
  memory unless the loss uses ``block_size`` (then memory stays bounded by the tiles).

  Args:
    encode_fn: ``encode_fn(params, inputs_chunk, rng) -> reps_chunk`` as in
      :func:`cached_value_and_grad`; it only ever sees rows of its own device.
    loss_fn: ``loss_fn(params, reps) -> scalar`` on the *global* representations
      (``"all_gather"``) or on this device's rows (``"ring"``, see above); called as
      ``loss_fn(params, reps, loss_inputs)`` when ``f`` gets ``loss_inputs`` (per-sample
      data such as labels, sharded like ``inputs``: gathered with the representations,
      or this device's rows with ``"ring"``).
    mesh: the device mesh (required), e.g. ``jax.make_mesh((jax.device_count(),),
      ("data",))``; ``params`` and ``rng`` are replicated over it.
    chunk_size: rows per chunk on each device (>= 1). With ``rng``, the local batch
      ``B / n`` must be divisible by it (so the chunks are the single-device ones).
    batch_axis: the mesh axis that shards axis 0 of every leaf of ``inputs``; ``B``
      must be divisible by its size ``n``. Other mesh axes replicate the computation.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``f`` returns ``((loss, aux), grads)``.
    loss_comm: ``"all_gather"`` (every device computes the whole loss on the gathered
      representations; any ``loss_fn``) or ``"ring"`` (the loss is split by rows over
      the devices, ``loss_fn`` uses the ring losses with ``axis_name=batch_axis``).

  Returns:
    ``f(params, inputs, *, rng=None, loss_inputs=None) -> (loss, grads)``,
    jit-compatible; the loss, aux and gradients are replicated over the mesh.

  Raises:
    TypeError: no ``mesh`` (or not a ``jax.sharding.Mesh``); ``encode_fn`` cannot be
      called as ``encode_fn(params, inputs, rng)``; (when ``f`` is called) the key is
      passed positionally or is not a key, or ``encode_fn`` needs a key and got ``None``.
    ValueError: ``batch_axis`` is not an axis of ``mesh``; an unknown ``loss_comm``;
      (when ``f`` is called) the batch is not divisible by ``n``, or, with ``rng``, the
      local batch is not divisible by ``chunk_size``; ``loss_inputs`` without the
      batch's rows; with ``"ring"``, a ``loss_fn`` that communicates nothing over
      ``batch_axis`` (a loss of the local rows only: ``axis_name=`` forgotten).

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))  # 1 device on a CPU
    >>> encode = lambda p, x, rng: x @ p["w"]
    >>> loss = lambda p, h: gradtx.nt_xent(h[::2], h[1::2], temperature=p["tau"])
    >>> params = {"w": jnp.eye(4)[:, :3], "tau": jnp.array(0.5)}
    >>> x = jax.random.normal(jax.random.key(0), (8, 4))
    >>> f = gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=2)
    >>> value, grads = jax.jit(f)(params, x)
    >>> ref_value, ref_grads = jax.value_and_grad(lambda p: loss(p, encode(p, x, None)))(params)
    >>> all(bool(jnp.allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)) for k in grads)
    True

  References:
    Gao, Zhang, Han, Callan, "Scaling deep contrastive learning batch size under memory
    limited setup" (GradCache), 2021, arXiv:2101.06983; Radford et al., "Learning
    transferable visual models from natural language supervision" (CLIP), 2021,
    arXiv:2103.00020 (global negatives by gathering features); Su, kexue.fm/archives/8471;
    Cheng et al., "Breaking the memory barrier" (Inf-CL), 2024, arXiv:2410.17243 (ring).
  """
  _cached.check_args(encode_fn, loss_fn, chunk_size, has_aux)
  mesh = _check_mesh(mesh, batch_axis)
  _checks.check_choice("loss_comm", loss_comm, _LOSS_COMMS)
  num_devices = mesh.shape[batch_axis]
  ring = loss_comm == "ring"

  def per_device(params, inputs, rng, loss_inputs):
    local = jax.tree.leaves(inputs)[0].shape[0]
    device = jax.lax.axis_index(batch_axis)
    passes = dict(chunk_size=chunk_size, rng=rng,
                  first_index=device * (local // chunk_size))  # this device's first chunk

    # Pass 1: this device's representations only, without gradients.
    local_reps = _cached.encode_chunks(encode_fn, jax.lax.stop_gradient(params), inputs,
                                       **passes)

    if ring:  # the ring losses: this device's rows only, G comes out split by rows
      loss = _cached.with_loss_inputs(loss_fn, loss_inputs)
      _check_ring_loss(loss, params, local_reps, batch_axis)
      value, own_grad, loss_grads = _cached.representation_grad(loss, params, local_reps,
                                                                has_aux=has_aux)
    else:  # global negatives: gather representations (not activations) from every device
      gather = lambda h: jax.lax.all_gather(h, batch_axis, axis=0, tiled=True)
      reps = jax.tree.map(gather, local_reps)
      loss = _cached.with_loss_inputs(loss_fn, jax.tree.map(gather, loss_inputs))
      value, reps_grad, loss_grads = _cached.representation_grad(loss, params, reps,
                                                                 has_aux=has_aux)
      own_grad = jax.tree.map(
          lambda g: jax.lax.dynamic_slice_in_dim(g, device * local, local, axis=0), reps_grad)

    # Pass 2: pull this device's rows of G back through its own chunks; sum over devices.
    encoder_grads = _cached.pull_back(encode_fn, params, inputs, own_grad, **passes)
    encoder_grads = jax.lax.psum(encoder_grads, batch_axis)
    return value, jax.tree.map(jnp.add, loss_grads, encoder_grads)

  # check_vma=False: with it on, autodiff w.r.t. the replicated params would insert a psum
  # per chunk, and one for the loss-side gradient too (counting it n times); here the
  # single psum is explicit.
  # jit: an eager shard_map would run its body op by op.
  sharded = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(batch_axis), P(), P(batch_axis)),
      out_specs=P(), check_vma=False))

  def value_and_grad(params, inputs, *extra_args, rng=None, loss_inputs=None):
    batch, rng = _cached.check_call(inputs, extra_args, rng, loss_inputs)
    _check_batch(batch, num_devices, batch_axis, chunk_size, rng is not None)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    inputs, loss_inputs = jax.device_put((inputs, loss_inputs),
                                         NamedSharding(mesh, P(batch_axis)))
    if rng is not None:
      rng = jax.device_put(rng, replicated)
    return sharded(params, inputs, rng, loss_inputs)

  return value_and_grad
