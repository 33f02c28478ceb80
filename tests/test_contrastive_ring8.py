"""The ring losses on 8 forced CPU devices (``tests/_sharded_contrastive_ring8.py``).

Every ring loss equals the dense one, value and gradients (10 local rows, blocks of 4),
and the cached variant with ``loss_comm="ring"`` and labels equals plain autodiff.
Marked slow (a second multi-device process); ``test_contrastive_ring.py`` runs the same
checks on 4 devices in CI.
"""

import os

import pytest
from _multidevice import case_tests

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("GRADTX_SLOW"),
                                 reason="8-device variant: GRADTX_SLOW=1")]

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "_sharded_contrastive_ring8.py")
CASES = (
    "ring_losses_equal_dense_tiled",
    "sharded_cached_ring_and_labels_equal_autodiff",
)

test_helper_runs_every_case, test_case = case_tests(CASES)
