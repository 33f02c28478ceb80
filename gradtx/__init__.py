"""gradtx: gradient techniques as composable optax transformations.

Every public name is re-exported here; import ``gradtx`` and use ``gradtx.<name>``.
"""

import importlib.metadata

from gradtx._paths import tree_paths
from gradtx.attribution import (
    TokenAttributions,
    blur_integrated_gradients,
    expected_gradients,
    gradient_x_input,
    guided_integrated_gradients,
    integrated_gradients,
    integrated_hessians,
    layer_integrated_gradients,
    saliency,
    smooth_grad,
    token_attributions,
)
from gradtx.child_tuning import (
    ChildTuningDState,
    ChildTuningFState,
    child_tuning_d,
    child_tuning_f,
    fisher_information,
    fisher_mask,
)
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
from gradtx.contrastive import (
    cached_value_and_grad,
    info_nce,
    l2_normalize,
    nt_xent,
    representation_grad,
    sharded_cached_value_and_grad,
    sigmoid_contrastive,
    supervised_contrastive,
    surrogate_loss,
)
from gradtx.curvature import (
    ScaleByDiagNewtonState,
    SophiaClipState,
    diag_newton,
    gnb_diagonal,
    hutchinson_diagonal,
    scale_by_diag_newton,
    sophia,
)
from gradtx.estimators import (
    ZerothOrderState,
    es_gradient,
    fill_masked,
    forward_gradient,
    hizoo_gradient,
    magnitude_mask,
    score_function_gradient,
    zeroth_order,
    zo_sgd_step,
)
from gradtx.exponentiated import (
    EGPlusMinusState,
    ExponentiatedGradientState,
    NormalizedMultiplicativeState,
    eg_plus_minus,
    exponentiated_gradient,
    normalized_multiplicative,
)
from gradtx.layerwise import (
    LayerwiseLrDecayState,
    ScaleByPathState,
    by_path,
    layer_depths,
    layerwise_lr_decay,
    path_labels,
    per_slice,
    scale_by_path,
)
from gradtx.step_size import (
    EGStepSizeState,
    HypergradientDescentState,
    eg_step_size,
    hypergradient_descent,
)

try:  # the one version: pyproject.toml's, read from the installed package's metadata
  __version__ = importlib.metadata.version("gradtx")
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, never installed
  __version__ = "0+unknown"

__all__ = (
    "AutoClipState",
    "ChildTuningDState",
    "ChildTuningFState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "EGPlusMinusState",
    "EGStepSizeState",
    "ExponentiatedGradientState",
    "HypergradientDescentState",
    "LayerwiseLrDecayState",
    "NormalizedMultiplicativeState",
    "ScaleByDiagNewtonState",
    "ScaleByPathState",
    "SophiaClipState",
    "TokenAttributions",
    "ZScoreClipState",
    "ZerothOrderState",
    "auto_clip",
    "blur_integrated_gradients",
    "by_path",
    "cached_value_and_grad",
    "child_tuning_d",
    "child_tuning_f",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "diag_newton",
    "eg_plus_minus",
    "eg_step_size",
    "es_gradient",
    "expected_gradients",
    "exponentiated_gradient",
    "fill_masked",
    "fisher_information",
    "fisher_mask",
    "forward_gradient",
    "global_norm",
    "gnb_diagonal",
    "gradient_x_input",
    "guided_integrated_gradients",
    "hizoo_gradient",
    "hutchinson_diagonal",
    "hypergradient_descent",
    "info_nce",
    "integrated_gradients",
    "integrated_hessians",
    "l2_normalize",
    "layer_depths",
    "layer_integrated_gradients",
    "layerwise_lr_decay",
    "magnitude_mask",
    "normalized_multiplicative",
    "nt_xent",
    "path_labels",
    "per_slice",
    "representation_grad",
    "saliency",
    "scale_by_diag_newton",
    "scale_by_path",
    "score_function_gradient",
    "sharded_cached_value_and_grad",
    "sigmoid_contrastive",
    "smooth_grad",
    "sophia",
    "supervised_contrastive",
    "surrogate_loss",
    "token_attributions",
    "tree_paths",
    "zeroth_order",
    "zo_sgd_step",
    "zscore_clip",
)
