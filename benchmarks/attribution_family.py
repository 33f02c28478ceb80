"""The attribution family: gradtx vs PAIR saliency and Captum; completeness; token memory.

Claims (issue #17): at equal settings on the CPU, gradtx's SmoothGrad, Integrated
Gradients, Guided IG and Blur IG are at least 10x faster per attribution than PAIR
saliency and Captum, with attributions that agree; the path methods' completeness error
falls with the steps; token attribution needs the memory of one forward-backward pass,
not ``steps`` of them.

Set-up: a small CNN (conv 3×3 1 → 8, conv 3×3 8 → 16 stride 2, dense 256 → 10, GELU)
trained briefly (Adam) on ``sklearn.datasets.load_digits`` (8×8 images in [0, 1]); the
true class's logit of ``NUM_EXAMPLES`` test images is attributed.

- *Speed* (one process, rounds interleaved by ``_common.time_interleaved``; ratios are
  medians of same-round ratios gradtx / other): gradtx jit-compiled on the whole batch;
  PAIR saliency (``saliency.core``, numpy, one image at a time, its
  ``call_model_function`` a jit-compiled JAX gradient: PAIR's own overhead is what is
  measured); Captum on a PyTorch copy of the CNN with the same weights (batched, CPU,
  ``torch.set_num_threads`` = the cores). Settings: SmoothGrad 32 samples at 15 % noise
  (PAIR ``GetSmoothedMask``, Captum ``NoiseTunnel(Saliency(abs=False))`` with the
  absolute σ of each image's range); IG 64 Gauss–Legendre steps (Captum); Guided IG 64
  steps, fraction 0.25, max_dist 0.02 (PAIR); Blur IG 32 steps, max_sigma 4 (PAIR).
  Agreement: the deterministic methods' max |Δ| relative to the largest |attribution|;
  the noise methods' Pearson correlation of the maps (different random draws).
- *Completeness*: mean over the examples of |δ| / |F(x) − F(x')| in float64 for IG
  (Gauss–Legendre), Guided IG and Blur IG (exact blur derivative, ``grad_step=None``)
  over a grid of steps.
- *Token memory*: a 2-block character-level causal transformer; XLA's compiled temporary
  memory (``memory_analysis``, compile only) of ``token_attributions`` (32 steps) with
  ``batch_size=1`` against all steps at once (``batch_size=None``), vs the sequence length.

``--quick``: fewer training steps, 4 examples, 2 rounds, a short grid, short sequences;
optional references are skipped (with a note) where not installed.
"""

from __future__ import annotations

import contextlib
import functools
import os

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gradtx

NAME = "attribution_family"
TARGET = {"speedup_min": 10.0, "agreement_rel": 1e-4, "noise_correlation_min": 0.9}
SETTINGS = {"smooth_grad": {"samples": 32, "stdev": 0.15}, "ig": {"steps": 64},
            "guided_ig": {"steps": 64, "fraction": 0.25, "max_dist": 0.02},
            "blur_ig": {"steps": 32, "max_sigma": 4.0}}
GRID = (4, 8, 16, 32, 64, 128)
SEQ_FULL, SEQ_QUICK = (256, 512, 1024, 2048, 4096), (64, 128)


# --------------------------------------------------------------------------- the model


def init_cnn(rng):
  normal = lambda shape, fan_in: jnp.asarray(
      rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in))
  return {"conv_0": {"kernel": normal((3, 3, 1, 8), 9), "bias": jnp.zeros(8)},
          "conv_1": {"kernel": normal((3, 3, 8, 16), 72), "bias": jnp.zeros(16)},
          **_common.init_dense(rng, [256, 10], ["dense"], gains=1.0)}


def cnn(params, x):
  """(N, 8, 8, 1) images -> (N, 10) logits."""
  dims = ("NHWC", "HWIO", "NHWC")
  for name, stride in (("conv_0", 1), ("conv_1", 2)):
    x = jax.lax.conv_general_dilated(x, params[name]["kernel"], (stride, stride),
                                     ((1, 1), (1, 1)), dimension_numbers=dims)
    x = jax.nn.gelu(x + params[name]["bias"])
  return x.reshape(x.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def train(steps, seed=0):
  from sklearn.datasets import load_digits

  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  params = init_cnn(np.random.default_rng(seed))
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(cnn(p, xb), yb).mean()
    updates, state = tx.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    j = (i * 128) % 1400
    params, state = step(params, state, x[j:j + 128], y[j:j + 128])
  accuracy = float(np.mean(np.argmax(cnn(params, x[1500:]), 1) == y[1500:]))
  return params, x[1500:], y[1500:], accuracy


def torch_cnn(torch, params):
  """The CNN in PyTorch (NCHW) with the same weights, float32."""
  tnn = torch.nn
  net = tnn.Sequential(tnn.Conv2d(1, 8, 3, padding=1), tnn.GELU(),
                       tnn.Conv2d(8, 16, 3, stride=2, padding=1), tnn.GELU(),
                       tnn.Flatten(), tnn.Linear(256, 10))
  t = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    for layer, name in ((net[0], "conv_0"), (net[2], "conv_1")):
      layer.weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
      layer.bias.copy_(t(params[name]["bias"]))
    # our flatten is NHWC: permute the dense rows from (h, w, c) to torch's (c, h, w)
    kernel = t(params["dense"]["kernel"]).reshape(4, 4, 16, 10).permute(2, 0, 1, 3)
    net[5].weight.copy_(kernel.reshape(256, 10).T)
    net[5].bias.copy_(t(params["dense"]["bias"]))
  net[1].approximate = net[3].approximate = "tanh"   # jax.nn.gelu's default
  return net.eval()


# ------------------------------------------------------------------------ references


@contextlib.contextmanager
def _numpy2_quantile():
  """PAIR's Guided IG calls ``np.quantile(..., interpolation=)``, which numpy 2 removed."""
  quantile = np.quantile
  np.quantile = lambda a, q, interpolation="linear", **kw: quantile(a, q, method=interpolation,
                                                                    **kw)
  try:
    yield
  finally:
    np.quantile = quantile


def pair_methods(core, params, x, y):
  """``{method: () -> (N, ...) attributions}`` with PAIR, one image at a time."""
  grad = jax.jit(jax.grad(lambda z, t: cnn(params, z[None])[0, t]))

  def call_model(target):
    def call(batch, call_model_args=None, expected_keys=None):
      grads = np.stack([np.asarray(grad(jnp.asarray(v, jnp.float32), target)) for v in batch])
      return {core.base.INPUT_OUTPUT_GRADIENTS: grads}
    return call

  s, g, b = SETTINGS["smooth_grad"], SETTINGS["guided_ig"], SETTINGS["blur_ig"]
  per_image = {
      "smooth_grad": lambda i: core.GradientSaliency().GetSmoothedMask(
          x[i], call_model(int(y[i])), stdev_spread=s["stdev"], nsamples=s["samples"],
          magnitude=False),
      "guided_ig": lambda i: core.GuidedIG().GetMask(
          x[i], call_model(int(y[i])), x_baseline=np.zeros_like(x[i]), x_steps=g["steps"],
          fraction=g["fraction"], max_dist=g["max_dist"]),
      "blur_ig": lambda i: core.BlurIG().GetMask(
          x[i], call_model(int(y[i])), steps=b["steps"], max_sigma=b["max_sigma"],
          batch_size=b["steps"]),
  }

  def run(method):
    with _numpy2_quantile():
      return np.stack([per_image[method](i) for i in range(len(x))])

  return {m: functools.partial(run, m) for m in per_image}


def captum_methods(torch, params, x, y):
  from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

  net = torch_cnn(torch, params)
  xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
  yt = torch.tensor(np.asarray(y).astype(np.int64))
  spread = (x.reshape(len(x), -1).max(1) - x.reshape(len(x), -1).min(1))
  stdevs = float(SETTINGS["smooth_grad"]["stdev"] * np.mean(spread))
  nhwc = lambda a: a.detach().permute(0, 2, 3, 1).numpy()
  return {
      "smooth_grad": lambda: nhwc(NoiseTunnel(Saliency(net)).attribute(
          xt, nt_type="smoothgrad", nt_samples=SETTINGS["smooth_grad"]["samples"],
          stdevs=stdevs, target=yt, abs=False)),
      "ig": lambda: nhwc(IntegratedGradients(net).attribute(
          xt, target=yt, n_steps=SETTINGS["ig"]["steps"], method="gausslegendre")),
  }


def gradtx_methods(params, x, y):
  s, g, b = SETTINGS["smooth_grad"], SETTINGS["guided_ig"], SETTINGS["blur_ig"]
  fn = lambda p: functools.partial(cnn, p)
  jitted = {
      "smooth_grad": jax.jit(lambda p, x, y: gradtx.smooth_grad(
          functools.partial(gradtx.saliency, fn(p), target=y), x, key=jax.random.key(0),
          samples=s["samples"], stdev=s["stdev"])),
      "ig": jax.jit(lambda p, x, y: gradtx.integrated_gradients(
          fn(p), x, steps=SETTINGS["ig"]["steps"], target=y)),
      "ig_unhoisted": jax.jit(lambda p, x, y: gradtx.integrated_gradients(
          fn(p), x, steps=SETTINGS["ig"]["steps"], target=y, hoist_affine=False)),
      "guided_ig": jax.jit(lambda p, x, y: gradtx.guided_integrated_gradients(
          fn(p), x, steps=g["steps"], fraction=g["fraction"], max_dist=g["max_dist"],
          target=y)),
      "blur_ig": jax.jit(lambda p, x, y: gradtx.blur_integrated_gradients(
          fn(p), x, steps=b["steps"], max_sigma=b["max_sigma"], target=y)),
  }
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  out = {m: functools.partial(f, params, xj, yj) for m, f in jitted.items()}
  out["ig_floor"] = functools.partial(jax.jit(ig_floor), params, xj, yj)
  return out


def ig_floor(params, x, y):
  """IG's floor: one jitted gradient of the target logits at all steps × N points at once
  (the Gauss–Legendre points, precomputed) — the gradient evaluations IG needs, without
  building or summing them."""
  steps = SETTINGS["ig"]["steps"]
  nodes = (np.polynomial.legendre.leggauss(steps)[0] + 1) / 2
  points = (jnp.asarray(nodes, x.dtype)[:, None, None, None, None] * x).reshape(
      (-1,) + x.shape[1:])
  labels = jnp.tile(y, steps)
  logit = lambda z: jnp.take_along_axis(cnn(params, z), labels[:, None], axis=1)[:, 0]
  return jax.grad(lambda z: jnp.sum(logit(z)))(points)


def agreement(method, ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if method == "smooth_grad":
    return {"kind": "correlation", "value": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])}
  return {"kind": "max |Δ| / max |attr|",
          "value": float(np.abs(ours - theirs).max() / np.abs(theirs).max())}


def speed(params, x, y, repeats, torch, core, bar):
  ours = gradtx_methods(params, x, y)
  others = {}
  if core is not None:
    others.update({("PAIR", m): f for m, f in pair_methods(core, params, x, y).items()})
  if torch is not None:
    others.update({("Captum", m): f for m, f in captum_methods(torch, params, x, y).items()})
  rows = []
  for (library, method), theirs in others.items():
    fns = {"gradtx": ours[method], "other": theirs}
    if method == "ig":
      fns["floor"], fns["unhoisted"] = ours["ig_floor"], ours["ig_unhoisted"]
    times = _common.time_interleaved(fns, repeats=repeats, warmup=1)
    ratio = _common.paired_ratio(times["other"], times["gradtx"])
    agree = agreement(method, ours[method](), theirs())
    ok = (agree["value"] >= TARGET["noise_correlation_min"] if agree["kind"] == "correlation"
          else agree["value"] <= TARGET["agreement_rel"])
    rows.append({"library": library, "method": method, "speedup": ratio,
                 "gradtx_ms": float(np.median(times["gradtx"]) * 1e3),
                 "other_ms": float(np.median(times["other"]) * 1e3), "agreement": agree,
                 "target_met": bool(ratio["median"] >= TARGET["speedup_min"] and ok)})
    if "floor" in times:
      rows[-1]["floor_ms"] = float(np.median(times["floor"]) * 1e3)
      rows[-1]["unhoisted_ms"] = float(np.median(times["unhoisted"]) * 1e3)
      rows[-1]["gradtx_over_floor"] = _common.paired_ratio(times["gradtx"], times["floor"])
      rows[-1]["unhoisted_over_floor"] = _common.paired_ratio(times["unhoisted"],
                                                              times["floor"])
      rows[-1]["unhoisted_agreement"] = agreement(method, ours["ig"](), ours["ig_unhoisted"]())
    bar.update()
  return rows


# --------------------------------------------------------------------- completeness


def completeness(params, x, y, grid, bar):
  curves = {"ig": [], "guided_ig": [], "blur_ig": []}
  with jax.enable_x64(True):
    p = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
    xs, ys = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    fn = functools.partial(cnn, p)
    rows = jnp.arange(len(x))
    out = fn(xs)[rows, ys]
    change = {"ig": out - fn(0 * xs)[rows, ys], "guided_ig": out - fn(0 * xs)[rows, ys],
              "blur_ig": out - fn(gradtx.attribution.gaussian_blur(
                  xs, SETTINGS["blur_ig"]["max_sigma"]))[rows, ys]}
    for steps in grid:
      deltas = {
          "ig": gradtx.integrated_gradients(fn, xs, steps=steps, target=ys,
                                            return_delta=True)[1],
          "guided_ig": gradtx.guided_integrated_gradients(fn, xs, steps=steps, target=ys,
                                                          return_delta=True)[1],
          "blur_ig": gradtx.blur_integrated_gradients(
              fn, xs, steps=steps, max_sigma=SETTINGS["blur_ig"]["max_sigma"],
              grad_step=None, target=ys, return_delta=True)[1]}
      for m, d in deltas.items():
        curves[m].append(float(np.mean(np.abs(np.asarray(d)) / np.abs(np.asarray(change[m])))))
      bar.update()
  return curves


# -------------------------------------------------------------------- token memory


class CharLM(nn.Module):
  """A 2-block causal character-level transformer: ids (N, T) -> logits (N, T, 64)."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(64, 64, name="embed")(ids)
    mask = nn.make_causal_mask(ids)
    for _ in range(2):
      h = h + nn.MultiHeadDotProductAttention(4, deterministic=True)(nn.LayerNorm()(h),
                                                                     mask=mask)
      h = h + nn.Dense(64)(nn.gelu(nn.Dense(256)(nn.LayerNorm()(h))))
    return nn.Dense(64)(nn.LayerNorm()(h))


def token_memory(lengths, bar):
  rows = []
  variables = CharLM().init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  for length in lengths:
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    temp = {}
    for label, batch_size in (("batch_size=1", 1), ("all steps at once", None)):
      attribute = jax.jit(lambda v, i, bs=batch_size: gradtx.token_attributions(
          lambda t: CharLM().apply(v, t), i, "embed", position=-1, target_token=0,
          steps=32, batch_size=bs).scores)
      analysis = attribute.lower(variables, ids).compile().memory_analysis()
      temp[label] = int(analysis.temp_size_in_bytes)
    rows.append({"length": length, "temp_bytes": temp,
                 "ratio": temp["all steps at once"] / temp["batch_size=1"]})
    bar.update()
  return rows


# ------------------------------------------------------------------------- reporting


def plot(speed_rows, curves, grid, memory_rows, out_dir):
  plt = _common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
  ax = axes[0]
  if speed_rows:
    labels = [f"{r['method']}\nvs {r['library']}" for r in speed_rows]
    med = np.array([r["speedup"]["median"] for r in speed_rows])
    lo = np.array([r["speedup"]["ci_low"] for r in speed_rows])
    hi = np.array([r["speedup"]["ci_high"] for r in speed_rows])
    ax.bar(np.arange(len(med)), med, yerr=[med - lo, hi - med], capsize=3)
    ax.set_xticks(np.arange(len(med)), labels, fontsize=8)
    ax.set_yscale("log")
  ax.axhline(TARGET["speedup_min"], color="tab:red", ls="--", label="target 10x")
  ax.set_ylabel("speed-up of gradtx (other time / gradtx time)")
  ax.set_title("Time per attribution, equal settings (CPU)")
  ax.legend()
  ax = axes[1]
  for method, errors in curves.items():
    ax.loglog(grid, np.maximum(errors, 1e-17), marker=".", label=method)
  ax.set_xlabel("steps")
  ax.set_ylabel("mean |δ| / |F(x) − F(x')|")
  ax.set_title("Completeness error (float64)")
  ax.legend()
  ax = axes[2]
  lengths = [r["length"] for r in memory_rows]
  for label in ("batch_size=1", "all steps at once"):
    ax.loglog(lengths, [r["temp_bytes"][label] / 2**20 for r in memory_rows], marker="o",
              label=label)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.set_xticks([], minor=True)
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("compiled temporary memory (MiB)")
  ax.set_title("Token attribution, 32 steps (compile only)")
  ax.legend()
  _common.save_figure(fig, out_dir, NAME)


def _optional(name):
  try:
    return __import__(name, fromlist=["_"])
  except ImportError:
    return None


def floor_notes(speed_rows):
  """A line per row timed against IG's floor: what the gradients alone cost."""
  ci = lambda r: f"95% CI {r['ci_low']:.2f}–{r['ci_high']:.2f}"
  return [
      f"IG's floor, one plain jitted `jax.grad` at all {SETTINGS['ig']['steps']} × N "
      f"points at once (same rounds): {r['floor_ms']:.1f} ms. gradtx with "
      f"`hoist_affine=False` (the CNN evaluated as is at every point): "
      f"{r['unhoisted_ms']:.1f} ms, {r['unhoisted_over_floor']['median']:.2f}x the floor "
      f"({ci(r['unhoisted_over_floor'])}): no cost beyond the gradients. gradtx by default "
      f"runs the first convolution (affine in the image) once per example, not once per "
      f"step: {r['gradtx_over_floor']['median']:.2f}x the floor "
      f"({ci(r['gradtx_over_floor'])}), attributions equal to "
      f"{r['unhoisted_agreement']['value']:.1e} of the largest. {r['library']} takes "
      f"{r['other_ms'] / r['floor_ms']:.1f}x the floor, so 10x would need IG at "
      f"{r['other_ms'] / (10 * r['floor_ms']):.2f}x the floor: what is left is the model's "
      "own gradient under XLA:CPU."
      for r in speed_rows if "floor_ms" in r]


def markdown(args, accuracy, speed_rows, notes, curves, grid, memory_rows, load):
  quick = " (quick)" if args.quick else ""
  speed_table = _common.markdown_table(
      ["method", "vs", "gradtx ms", "other ms", "speed-up (median)", "95% CI", "agreement",
       "target"],
      [[r["method"], r["library"], f"{r['gradtx_ms']:.1f}", f"{r['other_ms']:.1f}",
        f"{r['speedup']['median']:.1f}x",
        f"{r['speedup']['ci_low']:.1f}–{r['speedup']['ci_high']:.1f}",
        f"{r['agreement']['kind']} {r['agreement']['value']:.2g}",
        "met" if r["target_met"] else "NOT met"] for r in speed_rows])
  completeness_table = _common.markdown_table(
      ["method"] + [str(s) for s in grid],
      [[m] + [f"{e:.1e}" for e in errors] for m, errors in curves.items()])
  memory_table = _common.markdown_table(
      ["T", "batch_size=1 (MiB)", "all 32 steps at once (MiB)", "ratio"],
      [[r["length"], f"{r['temp_bytes']['batch_size=1'] / 2**20:.1f}",
        f"{r['temp_bytes']['all steps at once'] / 2**20:.1f}", f"{r['ratio']:.1f}x"]
       for r in memory_rows])
  return "\n".join([
      f"# The attribution family: gradtx vs PAIR saliency and Captum{quick}", "",
      f"Digits CNN (test accuracy {accuracy:.3f}), {args.num_examples} test images, the true "
      f"class's logit, on {_common.environment()['device']} ({jax.default_backend()}, "
      f"{os.cpu_count()} cores; 1-minute load average {load['start']:.1f} at the start, "
      f"{load['end']:.1f} at the end: the machine is shared). Settings: {SETTINGS}. "
      f"Speed-up = median over {args.repeats} interleaved rounds of other / gradtx (same "
      "round), with a bootstrap 95% CI. Target: ≥ 10x with agreement (deterministic: "
      f"max |Δ| ≤ {TARGET['agreement_rel']:g} of the largest |attribution|; noise: "
      f"correlation ≥ {TARGET['noise_correlation_min']}).", "",
      speed_table, "", *notes, *floor_notes(speed_rows), "",
      "## Completeness error vs steps", "",
      "Mean |δ| / |F(x) − F(x')| in float64 (IG: Gauss–Legendre, baseline zeros; Guided IG: "
      "baseline zeros; Blur IG: from the σ = max_sigma blur, exact blur derivative).", "",
      completeness_table, "",
      "## Token attribution memory vs sequence length", "",
      "A 2-block character-level causal transformer (d = 64, 4 heads); compiled temporary "
      "memory of `token_attributions(steps=32)` at the last position (XLA "
      "`memory_analysis`, compile only).", "",
      memory_table,
  ])


def main():
  args = _common.parse_args(__doc__.splitlines()[0], name=NAME)
  args.num_examples = 4 if args.quick else 16
  args.repeats = 2 if args.quick else 15
  train_steps = 20 if args.quick else 300
  grid = GRID[:3] if args.quick else GRID
  lengths = SEQ_QUICK if args.quick else SEQ_FULL
  load = {"start": os.getloadavg()[0]}
  torch, core = _optional("torch"), _optional("saliency.core")
  if _optional("captum") is None:
    torch = None
  notes = []
  if torch is None:
    notes.append("Captum: not installed (pip install captum torch): its rows are absent.")
  else:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  if core is None:
    notes.append("PAIR saliency: not installed (pip install saliency): its rows are absent.")
  params, x, y, accuracy = train(train_steps)
  x, y = x[:args.num_examples], y[:args.num_examples]
  total = (3 * (core is not None) + 2 * (torch is not None)) + len(grid) + len(lengths)
  with tqdm(total=total, desc=NAME) as bar:
    speed_rows = speed(params, x, y, args.repeats, torch, core, bar)
    curves = completeness(params, x, y, grid, bar)
    memory_rows = token_memory(lengths, bar)
  load["end"] = os.getloadavg()[0]
  text = markdown(args, accuracy, speed_rows, notes, curves, grid, memory_rows, load)
  _common.write_results(args.out, NAME, markdown=text, payload={
      "quick": args.quick, "settings": SETTINGS, "target": TARGET,
      "config": {"num_examples": args.num_examples, "repeats": args.repeats,
                 "train_steps": train_steps, "grid": list(grid), "lengths": list(lengths)},
      "test_accuracy": accuracy, "load_average": load, "speed": speed_rows, "notes": notes,
      "completeness": curves, "token_memory": memory_rows})
  plot(speed_rows, curves, grid, memory_rows, args.out)


if __name__ == "__main__":
  main()
