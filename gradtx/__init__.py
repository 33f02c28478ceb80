"""gradtx: gradient techniques as composable optax transformations.

Every public name is re-exported here; import ``gradtx`` and use ``gradtx.<name>``.
"""

from gradtx._tree import tree_paths
from gradtx.clipping import (
    AutoClipState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    ZScoreClipState,
    auto_clip,
    clip_by_global_norm,
    clip_by_leaf_norm,
    global_norm,
    zscore_clip,
)
from gradtx.layerwise import (
    LayerwiseLrDecayState,
    ScaleByPathState,
    by_path,
    layer_depths,
    layerwise_lr_decay,
    path_labels,
    scale_by_path,
)

__version__ = "0.1.0"

__all__ = (
    "AutoClipState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "LayerwiseLrDecayState",
    "ScaleByPathState",
    "ZScoreClipState",
    "auto_clip",
    "by_path",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "global_norm",
    "layer_depths",
    "layerwise_lr_decay",
    "path_labels",
    "scale_by_path",
    "tree_paths",
    "zscore_clip",
)
