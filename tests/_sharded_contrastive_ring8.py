"""``_sharded_contrastive_ring.py``'s ring-vs-dense cases on 8 forced CPU devices.

Run as ``python tests/_sharded_contrastive_ring8.py`` (``test_contrastive_ring8.py`` does).
"""

import os

os.environ["GRADTX_RING_DEVICES"] = "8"
os.environ.setdefault("GRADTX_RING_CASES", "ring_losses_equal_dense_tiled,"
                      "sharded_cached_ring_and_labels_equal_autodiff")

import _sharded_contrastive_ring  # noqa: E402 - after the device count is set

if __name__ == "__main__":
  _sharded_contrastive_ring.main()
