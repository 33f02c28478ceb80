r"""Gradients without backpropagation: evolution strategies, SPSA, forward gradients, REINFORCE.

(The package is not called ``zeroth_order``: that name is the transformation
``gradtx.zeroth_order``, which a submodule of the same name would shadow.)

The zeroth-order (ES) estimate of the gradient of the smoothed objective
``f_σ(θ) = E_ε f(θ + σε)`` is

.. math::
  \hat g = \frac{1}{N \sigma} \sum_{i=1}^{N} \big(f(\theta + \sigma \varepsilon_i) - b\big)
    \varepsilon_i, \qquad \mathbb{E}\,\varepsilon = 0,\ \mathrm{Cov}\,\varepsilon = I

with Gaussian ``ε`` (OpenAI ES) or Rademacher ``ε`` (SPSA), mirrored pairs ``±ε``
(antithetic: ``(f(θ+σε) - f(θ-σε)) / (2σ) · ε``), a baseline ``b`` and optional fitness
shaping. The policy gradient (score function) ``∇ E_{y~p_θ} r(y) = E[(r(y) - b) ∇ log
p_θ(y)]`` is the same estimator with the Gaussian search distribution as the policy
(Su): ``∇_θ log N(θ + σε; θ, σ²I) = ε / σ``.

Every member's noise is regenerated from ``fold_in(key, member)`` (and the leaf's path;
each entry a counter hash of its index, see :func:`es_gradient`), so the population never
has to exist at once: ``lean=True`` evaluates it one member at
a time (MeZO-style: memory of one inference plus one parameter-sized accumulator),
``batch_size`` vmaps chunks, and the default vmaps the whole population. All three, and
a population sharded over a device mesh, give the same estimate for the same key.
Speed against evosax and the memory of each mode: ``benchmarks/zeroth_order.py``, results
in ``benchmarks/results/zeroth_order.md``.

Fine-tuning at inference memory (MeZO and successors): :func:`zo_sgd_step` (the in-place
step), ``mask=`` (Sparse MeZO, :func:`magnitude_mask`), ``rank=`` (LOZO), :func:`hizoo_gradient`
(HiZOO) and ``zeroth_order("sign", ...)`` (ZO-SGD-Sign).

Layout: ``_common`` (each member's noise, fitness weights, input checks), ``_noise``
(masks and low-rank noise), ``_step`` (:func:`zo_sgd_step`), ``_hizoo``, ``_es``
(:func:`es_gradient`, ``ESOptions``, the evaluation strategies), ``_forward``
(:func:`forward_gradient`), ``_policy`` (:func:`score_function_gradient`), ``_transform``
(:func:`zeroth_order`, :func:`fill_masked`). No submodule is named after a public
function, so ``gradtx.estimators.zeroth_order`` stays the function.

References:
  Salimans, Ho, Chen, Sidor, Sutskever, "Evolution strategies as a scalable alternative
  to reinforcement learning", 2017, arXiv:1703.03864.
  Spall, "Multivariate stochastic approximation using a simultaneous perturbation
  gradient approximation", IEEE TAC 37(3), 1992 (SPSA).
  Malladi et al., "Fine-tuning language models with just forward passes", NeurIPS 2023,
  arXiv:2305.17333 (MeZO).
  Baydin, Pearlmutter, Syme, Wood, Torr, "Gradients without backpropagation", 2022,
  arXiv:2202.08587 (forward gradients).
  Williams, "Simple statistical gradient-following algorithms for connectionist
  reinforcement learning", Machine Learning 8, 1992 (REINFORCE).
  Su, "Policy gradient and zeroth-order optimisation are the same",
  kexue.fm/archives/7737.
"""

from gradtx.estimators._common import NOISES
from gradtx.estimators._es import BASELINES, SHAPINGS, ESOptions, es_gradient
from gradtx.estimators._forward import ForwardOptions, forward_gradient
from gradtx.estimators._hizoo import HiZOOOptions, hizoo_gradient
from gradtx.estimators._noise import magnitude_mask
from gradtx.estimators._policy import score_function_gradient
from gradtx.estimators._step import zo_sgd_step
from gradtx.estimators._transform import (
    OPTIONS,
    SignOptions,
    ZerothOrderState,
    fill_masked,
    zeroth_order,
)

ESTIMATORS = tuple(OPTIONS)

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "NOISES",
    "SHAPINGS",
    "ESOptions",
    "ForwardOptions",
    "HiZOOOptions",
    "SignOptions",
    "ZerothOrderState",
    "es_gradient",
    "fill_masked",
    "forward_gradient",
    "hizoo_gradient",
    "magnitude_mask",
    "score_function_gradient",
    "zeroth_order",
    "zo_sgd_step",
]
