"""The ring-sharded contrastive losses on 4 forced CPU devices equal the dense loss.

The checks run in one subprocess (``tests/_sharded_contrastive_ring.py``), once per
module (the ``multidevice_records`` fixture of ``conftest.py``); each case is a test:

- every ring loss (symmetric InfoNCE with and without labels, both directions in one
  ring; one-way InfoNCE with labels; NT-Xent, SupCon, SigLIP, SigLIP with labels), value
  and gradients w.r.t. ``a``, ``b``, ``τ``, ``β``, equals the single-device dense loss
  (rtol 1e-5), tiled with 10 local rows per block of 4, and with one tile per hop
  (``check_vma`` on and off; the latter with ``GRADTX_SLOW=1``);
- ``jax.grad`` through a shard_map'd ring loss, inputs created under ``jax.set_mesh``
  with an Explicit axis;
- the ring never all-gathers and never holds a (B, d) array; compiled, its ``value_and_grad``
  needs at most 7 local batches of temporaries (InfoNCE, NT-Xent, SigLIP);
- ``sharded_cached_value_and_grad(loss_comm="ring" | "all_gather")`` and
  ``cached_value_and_grad`` with ``loss_inputs=labels`` equal plain autodiff, also under
  an Explicit mesh; a ring ``loss_fn`` without ``axis_name`` is refused.
"""

import os

from _multidevice import case_tests

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_contrastive_ring.py")
SLOW = bool(os.environ.get("GRADTX_SLOW"))  # the helper runs the same subset
CASES = (
    "ring_losses_equal_dense_tiled",
    *(("ring_losses_equal_dense_one_tile_per_hop",) if SLOW else ()),
    "grad_outside_shard_map_explicit_mesh",
    "ring_never_gathers_the_batch",
    "ring_temporaries_are_a_few_local_batches",
    "sharded_cached_ring_and_labels_equal_autodiff",
    "sharded_cached_explicit_mesh",
    "ring_loss_fn_without_axis_name_is_refused",
)

test_helper_runs_every_case, test_case = case_tests(CASES)
