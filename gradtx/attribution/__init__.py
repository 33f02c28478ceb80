"""The attribution family for JAX and Flax: gradients, path methods, interactions, tokens.

``_integrated``: the quadratures, Integrated Gradients and Expected Gradients; ``_layer``:
Layer IG at a named layer of a Flax model; ``_gradients``: saliency, gradient x input,
SmoothGrad; ``_guided``: Guided IG; ``_blur``: Blur IG; ``_hessians``: Integrated
Hessians; ``_tokens``: next-token attribution for causal language models; ``_plot``: the
pictures (matplotlib imported only when called).
"""

from gradtx.attribution._blur import blur_integrated_gradients, gaussian_blur
from gradtx.attribution._gradients import gradient_x_input, saliency, smooth_grad
from gradtx.attribution._guided import guided_integrated_gradients
from gradtx.attribution._hessians import integrated_hessians
from gradtx.attribution._integrated import METHODS, expected_gradients, integrated_gradients
from gradtx.attribution._layer import layer_integrated_gradients
from gradtx.attribution._plot import plot_image, plot_tokens
from gradtx.attribution._tokens import TokenAttributions, token_attributions

__all__ = ("METHODS", "TokenAttributions", "blur_integrated_gradients", "expected_gradients",
           "gaussian_blur", "gradient_x_input", "guided_integrated_gradients",
           "integrated_gradients", "integrated_hessians", "layer_integrated_gradients",
           "plot_image", "plot_tokens", "saliency", "smooth_grad", "token_attributions")
