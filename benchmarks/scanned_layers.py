"""Scanned layers: per-slice clipping and layer-wise decay cost what per-layer rules cost.

A pre-LN residual MLP "transformer" of L blocks (width d, 4d hidden; embeddings and a
head), written twice with the same weights: unrolled (``blocks_0 … blocks_{L-1}``, a
Python loop) and scanned (``blocks/...`` stacked on axis 0, ``lax.scan``). The train step
is ``chain(clip_by_leaf_norm(1.0), adam(1e-3), layerwise_lr_decay(0.8))``: on the scanned
model with ``stacked={"blocks/.*": 0}``, on the unrolled one with per-layer rules. Per L:

* step time of scanned + ``stacked=`` over scanned + plain Adam (the price of the
  per-slice techniques), and over unrolled + per-layer rules (same maths, other layout);
* compile seconds of the whole step (grad + update), scanned and unrolled (median of 3);
* XLA temp memory of the compiled step (``memory_analysis``), scanned / unrolled;
* max |Δθ| between the two layouts after 3 steps (the same training, to float rounding).

``python benchmarks/scanned_layers.py [--quick]``.
"""

from __future__ import annotations

import os
import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import gradtx

NAME = "scanned_layers"
DECAY, GAMMA = 0.8, 1.0


def init(rng: np.random.Generator, layers: int, dim: int, vocab: int) -> dict:
  """Unrolled params ``{embed, blocks_i: {ln, w1, b1, w2, b2}, head}``."""
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]),
                                      jnp.float32)
  block = lambda: {"ln": jnp.ones(dim), "w1": normal(dim, 4 * dim), "b1": jnp.zeros(4 * dim),
                   "w2": normal(4 * dim, dim), "b2": jnp.zeros(dim)}
  return {"embed": normal(vocab, dim) * np.sqrt(vocab),
          **{f"blocks_{i}": block() for i in range(layers)}, "head": normal(dim, vocab)}


def stack(unrolled: dict, layers: int) -> dict:
  blocks = [unrolled[f"blocks_{i}"] for i in range(layers)]
  rest = {k: v for k, v in unrolled.items() if not k.startswith("blocks_")}
  return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def block(x: jax.Array, p: dict) -> jax.Array:
  h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * p["ln"]
  return x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss(params: dict, tokens: jax.Array, layers: int) -> jax.Array:
  x = params["embed"][tokens[:, :-1]]
  if "blocks" in params:
    x = jax.lax.scan(lambda x, p: (block(x, p), None), x, params["blocks"])[0]
  else:
    for i in range(layers):
      x = block(x, params[f"blocks_{i}"])
  logits = x @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def transforms(layers: int) -> dict[str, tuple[bool, optax.GradientTransformation]]:
  """``{name: (scanned?, tx)}`` for the three steps compared."""
  depths = {"embed": 0, "head": layers + 1}
  stacked = {"blocks/.*": 0}
  scanned = optax.chain(
      gradtx.clip_by_leaf_norm(GAMMA, stacked=stacked), optax.adam(1e-3),
      gradtx.layerwise_lr_decay(DECAY, num_layers=layers, stacked=stacked,
                                depth_rules={**depths, "blocks/.*": 1}))
  unrolled = optax.chain(
      gradtx.clip_by_leaf_norm(GAMMA), optax.adam(1e-3),
      gradtx.layerwise_lr_decay(DECAY, num_layers=layers,
                                depth_rules={**depths, r"blocks_(\d+)/.*": 1}))
  return {"scanned + stacked=": (True, scanned), "unrolled + rules": (False, unrolled),
          "scanned + adam": (True, optax.adam(1e-3)),
          "unrolled + adam": (False, optax.adam(1e-3))}


def make_step(tx: optax.GradientTransformation, layers: int):
  def step(params, state, tokens):
    grads = jax.grad(loss)(params, tokens, layers)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def measure(layers: int, dim: int, batch: int, seq: int, repeats: int, bar) -> dict:
  vocab = 512
  rng = np.random.default_rng(layers)
  unrolled = init(rng, layers, dim, vocab)
  scanned = stack(unrolled, layers)
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1)), jnp.int32)
  steps, args, compile_s, temp = {}, {}, {}, {}
  for name, (is_scanned, tx) in transforms(layers).items():
    params = scanned if is_scanned else unrolled
    state = tx.init(params)
    seconds = []
    for _ in range(3):  # compile time: lower + compile, median of 3 (no cache between)
      start = time.perf_counter()
      compiled = jax.jit(make_step(tx, layers)).lower(params, state, tokens).compile()
      seconds.append(time.perf_counter() - start)
    compile_s[name] = float(np.median(seconds))
    temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    steps[name], args[name] = compiled, (params, state, tokens)
  # Same training, two layouts: 3 steps each, compared slice by slice.
  runs = {}
  for name in ("scanned + stacked=", "unrolled + rules"):
    p, s, t = args[name]
    for _ in range(3):
      p, s = steps[name](p, s, t)
    runs[name] = p
  back = stack(runs["unrolled + rules"], layers)
  max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(runs["scanned + stacked="]), jax.tree.leaves(back), strict=True))
  times = _common.time_interleaved({n: (lambda n=n: steps[n](*args[n])) for n in steps},
                                   repeats=repeats, on_round=bar.update)
  return {
      "layers": layers,
      "vs_adam": _common.paired_ratio(times["scanned + stacked="], times["scanned + adam"]),
      "unrolled_vs_adam": _common.paired_ratio(times["unrolled + rules"],
                                               times["unrolled + adam"]),
      "vs_unrolled": _common.paired_ratio(times["scanned + stacked="],
                                          times["unrolled + rules"]),
      "compile_s": compile_s,
      "temp_bytes": temp,
      "max_abs_diff": max_diff,
      "median_ms": {n: float(np.median(t) * 1e3) for n, t in times.items()},
  }


def plot(rows: list[dict], out_dir) -> None:
  plt = _common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  ls = [r["layers"] for r in rows]
  for name, style in (("scanned + stacked=", "o-"), ("unrolled + rules", "s--")):
    left.plot(ls, [r["compile_s"][name] for r in rows], style, label=name)
  left.set(xlabel="layers L", ylabel="compile seconds (grad + update)",
           title="Compile time of the train step")
  left.legend()
  for key, label, style in (("vs_adam", "scanned + stacked= / scanned + adam", "o-"),
                            ("unrolled_vs_adam", "unrolled + rules / unrolled + adam", "^:"),
                            ("vs_unrolled", "scanned + stacked= / unrolled + rules", "s--")):
    med = np.array([r[key]["median"] for r in rows])
    err = np.array([[m - r[key]["ci_low"], r[key]["ci_high"] - m] for m, r in zip(
        med, rows, strict=True)]).T
    right.errorbar(ls, med, yerr=err, fmt=style, capsize=3, label=label)
  right.axhline(1.0, color="gray", lw=0.8)
  right.set(xlabel="layers L", ylabel="step-time ratio (median, 95% CI)",
            title="Per-slice clip + LLRD: step time")
  right.legend(fontsize=8)
  _common.save_figure(fig, out_dir, NAME)


def main() -> None:
  args = _common.parse_args(__doc__.splitlines()[0])
  layer_counts, dim, batch, seq, repeats = (
      ([2, 4], 64, 8, 16, 10) if args.quick else ([4, 8, 16], 128, 16, 64, 30))
  load = os.getloadavg()
  rows = []
  with tqdm(total=len(layer_counts) * (repeats + 2), desc=NAME) as bar:
    for layers in layer_counts:
      rows.append(measure(layers, dim, batch, seq, repeats, bar))
  load_after = os.getloadavg()
  mib = lambda r, n: f"{r['temp_bytes'][n] / 2**20:.1f}"
  table = _common.markdown_table(
      ["L", "scanned: stacked= / adam", "95% CI", "unrolled: rules / adam", "95% CI",
       "scanned+stacked= / unrolled+rules", "95% CI", "compile s scanned / unrolled",
       "temp MiB scanned: stacked= / adam", "temp MiB unrolled: rules / adam",
       "max \\|Δθ\\| after 3 steps"],
      [[r["layers"], _common.fmt_ratio(r["vs_adam"]), _common.fmt_ci(r["vs_adam"]),
        _common.fmt_ratio(r["unrolled_vs_adam"]), _common.fmt_ci(r["unrolled_vs_adam"]),
        _common.fmt_ratio(r["vs_unrolled"]), _common.fmt_ci(r["vs_unrolled"]),
        f"{r['compile_s']['scanned + stacked=']:.1f} / {r['compile_s']['unrolled + rules']:.1f}",
        f"{mib(r, 'scanned + stacked=')} / {mib(r, 'scanned + adam')}",
        f"{mib(r, 'unrolled + rules')} / {mib(r, 'unrolled + adam')}",
        f"{r['max_abs_diff']:.1e}"] for r in rows])
  markdown = (
      f"# Scanned layers: per-slice clipping and layer-wise decay\n\n"
      f"Residual MLP transformer, width {dim} (hidden {4 * dim}), vocab 512, batch {batch} × "
      f"{seq} tokens; train step = grad + chain(clip_by_leaf_norm({GAMMA}), adam, "
      f"layerwise_lr_decay({DECAY})), jit-compiled, on {jax.default_backend()} "
      f"({os.cpu_count()} CPUs, load average {load[0]:.1f} before, {load_after[0]:.1f} "
      f"after). Ratios: medians over {repeats} interleaved rounds of same-round step-time "
      "ratios, with the bootstrap 95% CI. Compile: lower + compile, median of 3. Temp: XLA "
      "`memory_analysis().temp_size_in_bytes` of the compiled step. \"stacked= / adam\": "
      "what the per-slice clip + LLRD add to a plain Adam step of the same model; "
      "\"scanned / unrolled\": the two layouts with the same techniques (the scan's own "
      "cost on this backend included).\n\n" + table + "\n")
  _common.write_results(args.out, NAME, payload={
      "quick": args.quick, "dim": dim, "batch": batch, "seq": seq, "repeats": repeats,
      "load_average": [load[0], load_after[0]], "rows": rows}, markdown=markdown)
  plot(rows, args.out)


if __name__ == "__main__":
  main()
