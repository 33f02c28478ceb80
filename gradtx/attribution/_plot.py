"""Pictures of attributions: heatmaps over images, shaded tokens (matplotlib when called).

matplotlib is an optional dependency (``pip install "gradtx[examples]"``): it is imported
inside the functions, so ``import gradtx`` never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from jax.typing import ArrayLike

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import FigureBase


def _pyplot() -> Any:
  try:
    import matplotlib.pyplot as plt
  except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("plot_image and plot_tokens need matplotlib: pip install matplotlib "
                      "(or gradtx[examples])") from error
  return plt


def _as_maps(attributions: ArrayLike,
             images: ArrayLike | None) -> tuple[np.ndarray, np.ndarray | None]:
  """(N, H, W) maps (channels summed) and (N, H, W[, C]) images in [0, 1], or None."""
  maps = np.asarray(attributions, np.float64)
  if maps.ndim == 2:
    maps = maps[None]
  if maps.ndim == 4:
    maps = maps.sum(axis=-1)
  if maps.ndim != 3:
    raise ValueError(f"attributions must be (H, W), (N, H, W) or (N, H, W, C), got shape "
                     f"{np.shape(attributions)}")
  if images is None:
    return maps, None
  pics = np.asarray(images, np.float64)
  if pics.ndim in (2, 3) and pics.shape[:2] == maps.shape[1:]:
    pics = pics[None]
  if pics.shape[:3] != maps.shape:
    raise ValueError(f"images must match the attributions' (N, H, W) = {maps.shape}, got "
                     f"shape {np.shape(images)}")
  if pics.ndim == 4 and pics.shape[-1] == 1:
    pics = pics[..., 0]
  low, high = pics.min(), pics.max()
  return maps, (pics - low) / (high - low) if high > low else np.zeros_like(pics)


def plot_image(attributions: ArrayLike, images: ArrayLike | None = None, *,
               titles: Sequence[str] | None = None, scale: str = "shared",
               signed: bool = True, alpha: float = 0.6, cmap: str | None = None,
               ax: Axes | Sequence[Axes] | np.ndarray | None = None,
               colorbar: bool = True) -> FigureBase:
  """Heatmaps of image attributions, over the images, with a colour bar.

  Channels are summed. With ``signed=True`` the colour map is diverging and centred at
  0 (red positive, blue negative); else the magnitudes ``|a|`` are shown.

  Args:
    attributions: (H, W), (N, H, W) or (N, H, W, C) attributions.
    images: the images (same N, H, W; grey or RGB) drawn in grey under the maps, or
      ``None``.
    titles: one title per image.
    scale: ``"shared"`` (one colour scale for all images, one colour bar) or
      ``"per_image"`` (each image its own scale and colour bar).
    signed: diverging colours around 0 (True) or magnitudes (False).
    alpha: the heatmap's opacity over the image.
    cmap: a matplotlib colour map (default ``"bwr"`` signed, ``"inferno"`` else).
    ax: a matplotlib Axes or a sequence of N Axes to draw in; ``None`` = a new figure.
    colorbar: draw colour bars.

  Returns:
    The matplotlib Figure.

  Example:
    >>> import numpy as np, gradtx
    >>> fig = gradtx.attribution.plot_image(np.random.randn(2, 8, 8, 1),
    ...                                     np.random.rand(2, 8, 8, 1), titles=["a", "b"])
    >>> len(fig.axes) >= 2
    True
  """
  if scale not in ("shared", "per_image"):
    raise ValueError(f"scale must be one of 'shared', 'per_image', got {scale!r}")
  maps, pics = _as_maps(attributions, images)
  plt = _pyplot()
  n = maps.shape[0]
  if titles is not None and len(titles) != n:
    raise ValueError(f"titles must have one title per image ({n}), got {len(titles)}")
  if ax is None:
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6), squeeze=False)
    axes = list(axes[0])
  else:
    axes = list(ax) if isinstance(ax, Sequence | np.ndarray) else [ax]
    fig = axes[0].figure
  values = maps if signed else np.abs(maps)
  cmap = cmap or ("bwr" if signed else "inferno")

  def limits(v):
    top = float(np.max(np.abs(v))) or 1.0
    return (-top, top) if signed else (0.0, top)

  shared = limits(values)
  image = None
  for i, axis in enumerate(axes[:n]):
    low, high = shared if scale == "shared" else limits(values[i])
    if pics is not None:
      axis.imshow(pics[i], cmap="gray" if pics.ndim == 3 else None)
    image = axis.imshow(values[i], cmap=cmap, vmin=low, vmax=high,
                        alpha=alpha if pics is not None else 1.0)
    axis.set_xticks([])
    axis.set_yticks([])
    if titles is not None:
      axis.set_title(titles[i], fontsize=9)
    if colorbar and scale == "per_image":
      fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
  if colorbar and scale == "shared" and image is not None:
    fig.colorbar(image, ax=axes[:n], fraction=0.046 / max(1, n) ** 0.5, pad=0.02)
  return fig


def plot_tokens(tokens: Sequence[str], scores: ArrayLike, *, ax: Axes | None = None,
                cmap: str = "bwr", title: str | None = None, wrap: int = 16) -> FigureBase:
  """Tokens shaded by their scores (red positive, blue negative, centred at 0).

  Args:
    tokens: the T tokens as strings.
    scores: (T,) scores (one example of :func:`token_attributions`' ``scores``).
    ax: a matplotlib Axes; ``None`` = a new figure.
    cmap: a diverging matplotlib colour map.
    title: the figure's title.
    wrap: tokens per line.

  Returns:
    The matplotlib Figure.

  Example:
    >>> import gradtx
    >>> fig = gradtx.attribution.plot_tokens(list("hello"), [0.1, -0.5, 0.0, 0.3, 1.0])
    >>> len(fig.axes)
    1
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or scores.shape[0] != len(tokens):
    raise ValueError(f"scores must be one score per token, shape ({len(tokens)},), got "
                     f"shape {scores.shape}")
  if wrap < 1:
    raise ValueError(f"wrap must be an int >= 1, got {wrap!r}")
  plt = _pyplot()
  lines = (len(tokens) + wrap - 1) // wrap
  if ax is None:
    fig, ax = plt.subplots(figsize=(0.6 * min(wrap, len(tokens)) + 0.4, 0.45 * lines + 0.3))
  else:
    fig = ax.figure
  top = float(np.max(np.abs(scores))) or 1.0
  colours = plt.get_cmap(cmap)
  for i, (token, score) in enumerate(zip(tokens, scores, strict=True)):
    row, col = divmod(i, wrap)
    ax.text(col + 0.5, lines - row - 0.5, token.replace("\n", "⏎").replace(" ", "␣"),
            ha="center", va="center", family="monospace", fontsize=10,
            bbox={"facecolor": colours(0.5 + 0.5 * score / top), "edgecolor": "none",
                  "boxstyle": "round,pad=0.2"})
  ax.set_xlim(0, min(wrap, len(tokens)))
  ax.set_ylim(0, lines)
  ax.axis("off")
  if title:
    ax.set_title(title, fontsize=9)
  return fig
