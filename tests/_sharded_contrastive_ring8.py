"""``_sharded_contrastive_ring.py``'s ring-vs-dense cases on 8 forced CPU devices.

Run as ``python tests/_sharded_contrastive_ring8.py`` (``test_contrastive_ring8.py`` does).
"""

import os

if __name__ == "__main__":
  # Set before the ring helper is imported: it reads the device count at import time.
  os.environ["GRADTX_RING_DEVICES"] = "8"
  os.environ.setdefault("GRADTX_RING_CASES", "ring_losses_equal_dense_tiled,"
                        "sharded_cached_ring_and_labels_equal_autodiff")
  import _sharded_contrastive_ring

  _sharded_contrastive_ring.main()
