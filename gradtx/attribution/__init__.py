"""Attributions that add up to the output: Integrated Gradients, Expected Gradients, and
Layer Integrated Gradients for Flax linen and nnx models.

``_integrated`` holds the quadratures and the chunked path integral over inputs;
``_layer`` cuts a Flax model at a named layer and integrates in that layer's output space.
"""

from gradtx.attribution._integrated import METHODS, expected_gradients, integrated_gradients
from gradtx.attribution._layer import layer_integrated_gradients

__all__ = ("METHODS", "expected_gradients", "integrated_gradients",
           "layer_integrated_gradients")
