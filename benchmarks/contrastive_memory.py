"""Memory and step time of exact large-batch contrastive gradients (GradCache, arXiv:2101.06983).

Claim: ``gradtx.cached_value_and_grad`` computes the full-batch gradient of a contrastive
loss with one chunk's encoder activations in memory (target: compiled temporary memory
<= 30% of the full-batch step's when B / chunk >= 8) at a modest cost in time (target:
step time <= 1.35x the full-batch step); and ``block_size=`` takes the B × B similarity
matrix out of memory too (target: ``value_and_grad`` of the symmetric InfoNCE at
B = 65536, d = 128, ``block_size=1024`` needs < 1 GiB of temporaries).

Set-up: CLIP-style two towers, each a 4-layer MLP 256 → 512 → 512 → 512 → 128 (GELU;
0.72M parameters per tower), symmetric InfoNCE (``gradtx.info_nce``, cosine similarity,
temperature 0.1) between the towers' representations of fixed synthetic inputs. One
train step is ``value_and_grad`` plus a plain SGD update, jit-compiled, for

- *full*: ``jax.value_and_grad`` of the loss of the whole batch (every activation kept);
- *two_pass*: ``gradtx.cached_value_and_grad(method="two_pass")`` (GradCache: encode all
  chunks without gradients, loss gradient w.r.t. the representations, re-encode each
  chunk and pull its rows back);
- *remat*: ``gradtx.cached_value_and_grad(method="remat")`` (``lax.map`` over
  ``jax.checkpoint(encode)``; autodiff rematerialises),

each with the dense loss (``block_size=None``) and with the blockwise loss
(``block_size=BLOCK``), for B in {1024, 4096, 16384} and chunks of 256 rows.

Memory: ``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``
(deterministic; parameters, inputs and outputs are not temporaries). A step whose
temporaries exceed 8 GiB is compiled but not executed (the machines here are small and
shared). Time: the compiled steps of one B are timed in interleaved rounds
(``_common.time_interleaved``) and reported as the median over rounds of the same-round
ratio to *full* with the same loss, with a bootstrap 95% confidence interval. After the
timing, every variant's updated parameters are compared with the dense full-batch
step's (``max |Δθ|``): all six compute the same update.

The blockwise loss alone: compile-only ``memory_analysis`` of ``value_and_grad`` w.r.t.
both (65536, 128) representations of ``info_nce(a, b, temperature=0.1,
block_size=1024)``, next to the dense loss's (also compile-only: never executed at this
size) and the 16 GiB of one dense float32 similarity matrix.

Transformer towers (compile-only): the MLP above is small enough that the dense loss's
B × B temporaries dominate its step's memory, so a second section repeats the memory
measurement (``memory_analysis`` only: nothing is executed or timed) with CLIP-style
towers that are small transformers (Flax linen): an input of shape (32, 64) — 32 tokens
of 64 features — embedded to width 128 (plus learned position embeddings), 2 pre-LN
blocks (4-head self-attention, MLP 128 → 512 → 128, GELU), final LayerNorm, mean-pool,
projection to 128; the same three methods, dense and blockwise loss, batches and chunks.

``--quick``: B in {256, 1024} (transformer: 256), chunks of 64, ``block_size=256``, 3
rounds: a smoke run (the memory figures are exact; the time ratios of such small steps
mean little).

``--section transformer``: measure only the transformer section; the MLP section (and
the loss-alone figures) are read from the existing ``<out>/contrastive_memory.json``,
so the results are rewritten complete without re-timing the MLP.
"""

from __future__ import annotations

import importlib.util
import json
import time
from typing import Any

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import gradtx

NAME = "contrastive_memory"
DIMS = (256, 512, 512, 512, 128)
TEMPERATURE = 0.1
LEARNING_RATE = 1e-2
MAX_EXECUTED_TEMP = 8 * 2**30  # compile, but do not run, steps needing more temporaries
MEMORY_TARGET = 0.30  # cached temp / full temp, when batch / chunk >= MIN_CHUNKS
MIN_CHUNKS = 8
TIME_TARGET = 1.35  # cached step time / full step time
LOSS_ONLY_BATCH, LOSS_ONLY_DIM, LOSS_ONLY_BLOCK = 65536, 128, 1024
LOSS_ONLY_TARGET = 2**30
METHODS = ("full", "two_pass", "remat")

FULL = {"batches": (1024, 4096, 16384), "chunk": 256, "block": 1024,
        # B -> (warm-up rounds, recorded rounds): a dense step at B = 16384 takes ~30 s here.
        "rounds": {1024: (2, 15), 4096: (1, 6), 16384: (1, 2)}}
# Transformer towers (compile-only section).
SEQ_LEN, TOKEN_DIM, WIDTH, HEADS, MLP_DIM, LAYERS, OUT_DIM = 32, 64, 128, 4, 512, 2, 128

QUICK = {"batches": (256, 1024), "chunk": 64, "block": 256,
         "rounds": {256: (1, 3), 1024: (1, 3)},
         "transformer_batches": (256,)}  # compile-only, seconds per variant on CPU
# (The blockwise loss is measured where B > block_size: 4096 and 16384; 1024 in --quick.)


# --------------------------------------------------------------------------- model


def init_tower(key: jax.Array) -> list[dict[str, jax.Array]]:
  layers = []
  for k, fan_in, fan_out in zip(jax.random.split(key, len(DIMS) - 1), DIMS[:-1], DIMS[1:],
                                strict=True):
    layers.append({"kernel": jax.random.normal(k, (fan_in, fan_out)) * fan_in ** -0.5,
                   "bias": jnp.zeros((fan_out,))})
  return layers


def tower(layers, x):
  for i, layer in enumerate(layers):
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(layers) - 1:
      x = jax.nn.gelu(x)
  return x


def encode(params, inputs, rng):
  del rng  # no dropout
  return {"a": tower(params["a"], inputs["a"]), "b": tower(params["b"], inputs["b"])}


class Block(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=WIDTH)(y, y)
    y = nn.LayerNorm()(x)
    y = nn.Dense(WIDTH)(jax.nn.gelu(nn.Dense(MLP_DIM)(y)))
    return x + y


class TransformerTower(nn.Module):
  """(B, SEQ_LEN, TOKEN_DIM) → token embedding + positions → blocks → LN → mean → proj."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH)(x)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ_LEN, WIDTH))
    for _ in range(LAYERS):
      x = Block()(x)
    return nn.Dense(OUT_DIM)(nn.LayerNorm()(x).mean(axis=1))


TRANSFORMER = TransformerTower()


def transformer_encode(params, inputs, rng):
  del rng  # no dropout
  return {"a": TRANSFORMER.apply(params["a"], inputs["a"]),
          "b": TRANSFORMER.apply(params["b"], inputs["b"])}


def make_loss(block_size: int | None):
  def loss_fn(params, reps):
    del params  # fixed temperature: no loss-side parameters
    return gradtx.info_nce(reps["a"], reps["b"], temperature=TEMPERATURE,
                           block_size=block_size)
  return loss_fn


def make_step(method: str, block_size: int | None, chunk: int, encode=encode):
  """``step(params, inputs) -> (params - lr · grad, loss)``, not yet jit-compiled."""
  loss_fn = make_loss(block_size)
  if method == "full":
    def value_and_grad(params, inputs):
      return jax.value_and_grad(lambda p: loss_fn(p, encode(p, inputs, None)))(params)
  else:
    value_and_grad = gradtx.cached_value_and_grad(encode, loss_fn, chunk_size=chunk,
                                                  method=method)

  def step(params, inputs):
    loss, grads = value_and_grad(params, inputs)
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss
  return step


def blockwise_status() -> str | None:
  """``None`` if the blockwise loss works here, else why not (it is written separately)."""
  if importlib.util.find_spec("gradtx.contrastive._blockwise") is None:
    return "gradtx/contrastive/_blockwise.py does not exist"
  try:
    a = jnp.eye(4)
    jax.block_until_ready(gradtx.info_nce(a, a, temperature=1.0, block_size=2))
  except Exception as error:  # report any failure instead of crashing
    return f"{type(error).__name__}: {error}"
  return None


# ------------------------------------------------------------------------ measuring


def memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  return {key: int(getattr(analysis, f"{key}_size_in_bytes"))
          for key in ("temp", "argument", "output", "generated_code")}


def variants(batch: int, blockwise: bool, block: int) -> list[tuple[str, str, int | None]]:
  """(method, loss label, block_size) of every step measured at this batch size.

  The blockwise loss only where ``batch > block``: below, it is one tile, the dense loss.
  """
  losses = [("dense", None)]
  if blockwise and batch > block:
    losses.append((f"blockwise {block}", block))
  return [(method, label, size) for label, size in losses for method in METHODS]


def measure_batch(batch, config, blockwise, params, bar) -> list[dict[str, Any]]:
  chunk, block = config["chunk"], config["block"]
  warmup, repeats = config["rounds"][batch]
  key_a, key_b = jax.random.split(jax.random.PRNGKey(batch))
  inputs = {"a": jax.random.normal(key_a, (batch, DIMS[0])),
            "b": jax.random.normal(key_b, (batch, DIMS[0]))}
  rows, fns, outputs = [], {}, {}
  for method, loss_label, block_size in variants(batch, blockwise, block):
    start = time.perf_counter()
    compiled = jax.jit(make_step(method, block_size, chunk)).lower(params, inputs).compile()
    row = {"batch": batch, "chunk": chunk, "num_chunks": -(-batch // chunk),
           "method": method, "loss": loss_label, "block_size": block_size,
           "memory": memory(compiled), "compile_s": time.perf_counter() - start,
           "executed": True, "note": ""}
    if row["memory"]["temp"] > MAX_EXECUTED_TEMP:
      row["executed"] = False
      row["note"] = (f"not executed: {row['memory']['temp'] / 2**30:.1f} GiB of temporaries "
                     f"> {MAX_EXECUTED_TEMP / 2**30:.0f} GiB limit")
    else:
      name = f"{method}|{loss_label}"

      def call(compiled=compiled, name=name):
        outputs[name] = compiled(params, inputs)
        return outputs[name]
      fns[name] = call
    rows.append(row)
    bar.set_postfix_str(f"B={batch} compiled {method}/{loss_label}")

  times = _common.time_interleaved(fns, repeats=repeats, warmup=warmup, seed=batch,
                                   on_round=bar.update) if fns else {}
  reference = outputs.get("full|dense")
  for row in rows:
    name = f"{row['method']}|{row['loss']}"
    baseline = next(r for r in rows if r["loss"] == row["loss"] and r["method"] == "full")
    dense_full = next(r for r in rows if r["loss"] == "dense" and r["method"] == "full")
    row["memory_vs_full"] = row["memory"]["temp"] / baseline["memory"]["temp"]
    row["memory_vs_full_dense"] = row["memory"]["temp"] / dense_full["memory"]["temp"]
    row["time_vs_full"] = None
    row["median_s"] = float(np.median(times[name])) if name in times else None
    full_name = f"full|{row['loss']}"
    if name in times and full_name in times:
      row["time_vs_full"] = _common.paired_ratio(times[name], times[full_name])
    row["time_vs_full_dense"] = (_common.paired_ratio(times[name], times["full|dense"])
                                 if name in times and "full|dense" in times else None)
    row["loss_value"] = float(outputs[name][1]) if name in outputs else None
    row["max_abs_param_diff"] = None
    if name in outputs and reference is not None:
      row["max_abs_param_diff"] = max(
          float(jnp.max(jnp.abs(u - v))) for u, v in
          zip(jax.tree.leaves(outputs[name][0]), jax.tree.leaves(reference[0]), strict=True))
    cached = row["method"] != "full"
    applies = cached and row["num_chunks"] >= MIN_CHUNKS
    row["memory_target_met"] = row["memory_vs_full"] <= MEMORY_TARGET if applies else None
    row["time_target_met"] = (row["time_vs_full"]["median"] <= TIME_TARGET
                              if cached and row["time_vs_full"] else None)
  return rows


def measure_loss_only(blockwise_reason: str | None) -> dict[str, Any]:
  """Compile-only memory of the symmetric InfoNCE's gradient at B = 65536, d = 128."""
  shape = jax.ShapeDtypeStruct((LOSS_ONLY_BATCH, LOSS_ONLY_DIM), jnp.float32)

  def compiled_temp(block_size):
    grad = jax.value_and_grad(
        lambda a, b: gradtx.info_nce(a, b, temperature=TEMPERATURE, block_size=block_size),
        argnums=(0, 1))
    return memory(jax.jit(grad).lower(shape, shape).compile())

  result = {
      "batch": LOSS_ONLY_BATCH, "dim": LOSS_ONLY_DIM, "block_size": LOSS_ONLY_BLOCK,
      "dense_matrix_bytes": LOSS_ONLY_BATCH**2 * 4,
      "dense": compiled_temp(None),
      "target_bytes": LOSS_ONLY_TARGET,
      "available": blockwise_reason is None,
      "note": "" if blockwise_reason is None else f"not available: {blockwise_reason}",
  }
  if blockwise_reason is None:
    result["blockwise"] = compiled_temp(LOSS_ONLY_BLOCK)
    result["target_met"] = result["blockwise"]["temp"] < LOSS_ONLY_TARGET
  else:
    result["blockwise"], result["target_met"] = None, None
  return result


def transformer_params_shape():
  x = jnp.zeros((1, SEQ_LEN, TOKEN_DIM))
  return jax.eval_shape(
      lambda: {"a": TRANSFORMER.init(jax.random.PRNGKey(1), x),
               "b": TRANSFORMER.init(jax.random.PRNGKey(2), x)})


def measure_transformer(config, blockwise, bar) -> dict[str, Any]:
  """Compile-only temporaries of the transformer-tower steps (nothing is executed)."""
  params = transformer_params_shape()
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  chunk, block = config["chunk"], config["block"]
  rows = []
  batches = config.get("transformer_batches", config["batches"])
  for batch in batches:
    x = jax.ShapeDtypeStruct((batch, SEQ_LEN, TOKEN_DIM), jnp.float32)
    inputs = {"a": x, "b": x}
    for method, loss_label, block_size in variants(batch, blockwise, block):
      bar.set_postfix_str(f"transformer B={batch} {method}/{loss_label} (compile-only)")
      start = time.perf_counter()
      step = make_step(method, block_size, chunk, encode=transformer_encode)
      compiled = jax.jit(step).lower(params, inputs).compile()
      rows.append({"batch": batch, "chunk": chunk, "num_chunks": -(-batch // chunk),
                   "method": method, "loss": loss_label, "block_size": block_size,
                   "memory": memory(compiled), "compile_s": time.perf_counter() - start})
  for row in rows:
    same = [r for r in rows if r["batch"] == row["batch"] and r["method"] == "full"]
    baseline = next(r for r in same if r["loss"] == row["loss"])
    dense_full = next(r for r in same if r["loss"] == "dense")
    row["memory_vs_full"] = row["memory"]["temp"] / baseline["memory"]["temp"]
    row["memory_vs_full_dense"] = row["memory"]["temp"] / dense_full["memory"]["temp"]
    applies = row["method"] != "full" and row["num_chunks"] >= MIN_CHUNKS
    row["memory_target_met"] = row["memory_vs_full"] <= MEMORY_TARGET if applies else None
  return {"config": {"seq_len": SEQ_LEN, "token_dim": TOKEN_DIM, "width": WIDTH,
                     "heads": HEADS, "mlp_dim": MLP_DIM, "layers": LAYERS,
                     "out_dim": OUT_DIM, "num_params": num_params, "towers": 2,
                     "batches": list(batches), "chunk": chunk,
                     "block_size": block},
          "rows": rows}


# ------------------------------------------------------------------------- reporting


def mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:,.1f}"


def verdict(met: bool | None) -> str:
  return "n/a" if met is None else ("yes" if met else "**no**")


def table(rows) -> str:
  body = []
  for row in rows:
    ratio = row["time_vs_full"]
    cached = row["method"] != "full"
    body.append([
        row["batch"], row["num_chunks"], row["loss"], row["method"],
        mib(row["memory"]["temp"]),
        f"{row['memory_vs_full']:.3f}", f"{row['memory_vs_full_dense']:.3f}",
        "not run" if not row["executed"] else
        (f"{ratio['median']:.3f}" if ratio else "—"),
        f"{ratio['ci_low']:.2f}–{ratio['ci_high']:.2f}" if ratio and cached else "—",
        f"{row['median_s']:.3f}" if row["median_s"] is not None else "—",
        f"{row['max_abs_param_diff']:.1e}" if row["max_abs_param_diff"] is not None else "—",
        verdict(row["memory_target_met"]) if cached else "—",
        verdict(row["time_target_met"]) if cached else "—",
    ])
  return _common.markdown_table(
      ["B", "B / chunk", "loss", "method", "temp MiB", "temp / full", "temp / full dense",
       "time / full", "95% CI", "median s", "max \\|Δθ\\| vs full dense",
       f"temp ≤ {MEMORY_TARGET:.0%}", f"time ≤ {TIME_TARGET}"], body)


def transformer_table(rows) -> str:
  body = []
  for row in rows:
    cached = row["method"] != "full"
    body.append([
        row["batch"], row["num_chunks"], row["loss"], row["method"],
        mib(row["memory"]["temp"]),
        f"{row['memory_vs_full']:.3f}", f"{row['memory_vs_full_dense']:.3f}",
        verdict(row["memory_target_met"]) if cached else "—",
    ])
  return _common.markdown_table(
      ["B", "B / chunk", "loss", "method", "temp MiB", "temp / full", "temp / full dense",
       f"temp ≤ {MEMORY_TARGET:.0%}"], body)


def transformer_lines(transformer) -> list[str]:
  cfg, rows = transformer["config"], transformer["rows"]
  checked = [r for r in rows if r["memory_target_met"] is not None]
  return [
      "## Transformer towers (compile-only memory)",
      "",
      f"Two towers, each a pre-LN transformer: input ({cfg['seq_len']} tokens × "
      f"{cfg['token_dim']} features) → token embedding to width {cfg['width']} + learned "
      f"positions → {cfg['layers']} blocks ({cfg['heads']}-head self-attention, MLP "
      f"{cfg['width']} → {cfg['mlp_dim']} → {cfg['width']}, GELU) → LayerNorm → mean-pool → "
      f"projection to {cfg['out_dim']} ({cfg['num_params'] / 1e6:.2f}M parameters in all); "
      f"same loss, train step, methods and chunks of {cfg['chunk']} rows, blockwise loss "
      f"with `block_size={cfg['block_size']}` where B > block_size. Memory here is "
      "compile-time `memory_analysis().temp_size_in_bytes` only: these steps are compiled, "
      "never executed; step time is measured on the MLP configuration only, because "
      "full-batch transformer steps at large B do not fit this machine's 24 GiB of memory.",
      "",
      transformer_table(rows),
      "",
      f"Memory target met in {sum(r['memory_target_met'] for r in checked)}/{len(checked)} "
      "applicable rows.",
  ]


def loss_only_lines(loss_only) -> list[str]:
  b, d = loss_only["batch"], loss_only["dim"]
  lines = [
      f"Loss alone (compile-only, never executed): `value_and_grad` w.r.t. both ({b}, {d}) "
      f"representations of the symmetric `info_nce(a, b, temperature={TEMPERATURE})`:",
      "",
      f"- one dense float32 {b} × {b} similarity matrix: "
      f"{loss_only['dense_matrix_bytes'] / 2**30:.1f} GiB;",
      f"- dense loss (`block_size=None`), compiled temporaries: "
      f"{loss_only['dense']['temp'] / 2**30:,.1f} GiB;",
  ]
  if loss_only["available"]:
    temp = loss_only["blockwise"]["temp"]
    lines.append(
        f"- blockwise loss (`block_size={loss_only['block_size']}`), compiled temporaries: "
        f"{mib(temp)} MiB — target < 1 GiB: {verdict(loss_only['target_met'])} "
        f"({loss_only['dense']['temp'] / temp:,.0f}× less than dense).")
  else:
    lines.append(f"- blockwise loss (`block_size={loss_only['block_size']}`): "
                 f"{loss_only['note']}.")
  return lines


def plot(rows, loss_only, config, transformer, out_dir):
  plt = _common.pyplot()
  fig, (ax_mem, ax_time, ax_tf) = plt.subplots(1, 3, figsize=(19, 5))
  styles = {"full": ("tab:gray", "o"), "two_pass": ("tab:blue", "s"),
            "remat": ("tab:orange", "^")}
  losses = list(dict.fromkeys(row["loss"] for row in rows))
  for loss in losses:
    line = "-" if loss == "dense" else "--"
    for method, (color, marker) in styles.items():
      sel = [r for r in rows if r["loss"] == loss and r["method"] == method]
      batches = [r["batch"] for r in sel]
      ax_mem.plot(batches, [r["memory"]["temp"] / 2**20 for r in sel], line, color=color,
                  marker=marker, markerfacecolor="none" if method == "remat" else color,
                  markersize=9 if method == "remat" else 6, label=f"{method}, {loss} loss")
      if method == "full":
        continue
      timed = [r for r in sel if r["time_vs_full"]]
      if timed:
        med = np.array([r["time_vs_full"]["median"] for r in timed])
        lo = np.array([r["time_vs_full"]["ci_low"] for r in timed])
        hi = np.array([r["time_vs_full"]["ci_high"] for r in timed])
        ax_time.errorbar([r["batch"] for r in timed], med, yerr=[med - lo, hi - med],
                         fmt=line, color=color, marker=marker, capsize=3,
                         label=f"{method}, {loss} loss (vs full, {loss} loss)")
  b = loss_only["batch"]
  ax_mem.plot([b], [loss_only["dense"]["temp"] / 2**20], "x", color="black", markersize=9,
              label=f"loss alone, dense (B={b}, compile-only)")
  ax_mem.plot([b], [loss_only["dense_matrix_bytes"] / 2**20], "+", color="black",
              markersize=11, label=f"one dense {b}² float32 matrix")
  if loss_only["available"]:
    ax_mem.plot([b], [loss_only["blockwise"]["temp"] / 2**20], "*", color="tab:green",
                markersize=13, label=f"loss alone, block_size={loss_only['block_size']}")
  ax_mem.axhline(MAX_EXECUTED_TEMP / 2**20, color="tab:red", ls=":", lw=1,
                 label="8 GiB: not executed above")
  ax_mem.set_xscale("log", base=2)
  ax_mem.set_yscale("log")
  ax_mem.set_xlabel("batch size B")
  ax_mem.set_ylabel("compiled temporaries (MiB)")
  ax_mem.set_title(f"Train-step temporaries (chunk {config['chunk']})")
  ax_mem.legend(fontsize=7, loc="upper left")
  ax_time.axhline(1.0, color="black", lw=1)
  ax_time.axhline(TIME_TARGET, color="tab:red", ls="--", lw=1, label=f"target {TIME_TARGET}")
  ax_time.set_xscale("log", base=2)
  ax_time.set_xlabel("batch size B")
  ax_time.set_ylabel("step time / full-batch step time (median; 95% CI)")
  ax_time.set_title("Step-time ratio vs full batch with the same loss")
  ax_time.legend(fontsize=7)
  rows_tf = transformer["rows"]
  for loss in dict.fromkeys(row["loss"] for row in rows_tf):
    line = "-" if loss == "dense" else "--"
    for method, (color, marker) in styles.items():
      sel = [r for r in rows_tf if r["loss"] == loss and r["method"] == method]
      ax_tf.plot([r["batch"] for r in sel], [r["memory"]["temp"] / 2**20 for r in sel], line,
                 color=color, marker=marker,
                 markerfacecolor="none" if method == "remat" else color,
                 markersize=9 if method == "remat" else 6, label=f"{method}, {loss} loss")
  ax_tf.set_xscale("log", base=2)
  ax_tf.set_yscale("log")
  ax_tf.set_xlabel("batch size B")
  ax_tf.set_ylabel("compiled temporaries (MiB)")
  ax_tf.set_title(f"Transformer towers: temporaries, compile-only "
                  f"(chunk {transformer['config']['chunk']})")
  ax_tf.legend(fontsize=7, loc="upper left")
  fig.suptitle("Exact large-batch contrastive gradients, symmetric InfoNCE: two-tower MLP "
               "(left, middle), two-tower transformer (right)")
  _common.save_figure(fig, out_dir, NAME)


def add_options(parser):
  parser.add_argument(
      "--section", choices=("all", "transformer"), default="all",
      help="'transformer': measure only the (compile-only) transformer section and read the "
           "MLP section from the existing <out>/contrastive_memory.json")


def measure_mlp(config, reason, bar) -> dict[str, Any]:
  """The MLP section (memory, timing, agreement) and the loss-alone figures."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  params = {"a": init_tower(key_a), "b": init_tower(key_b)}
  num_params = sum(p.size for p in jax.tree.leaves(params))
  rows = []
  for batch in config["batches"]:
    rows += measure_batch(batch, config, reason is None, params, bar)
  bar.set_postfix_str(f"loss alone, B={LOSS_ONLY_BATCH} (compile-only)")
  loss_only = measure_loss_only(reason)
  return {
      "config": {"dims": DIMS, "num_params": num_params, "temperature": TEMPERATURE,
                 "learning_rate": LEARNING_RATE, "batches": config["batches"],
                 "chunk": config["chunk"], "block_size": config["block"],
                 "rounds": {str(b): list(r) for b, r in config["rounds"].items()},
                 "max_executed_temp": MAX_EXECUTED_TEMP},
      "target": {"memory_vs_full_max": MEMORY_TARGET, "min_chunks": MIN_CHUNKS,
                 "time_vs_full_max": TIME_TARGET, "loss_only_temp_max": LOSS_ONLY_TARGET},
      "blockwise_available": reason is None,
      "blockwise_note": reason or "",
      "rows": rows,
      "loss_only": loss_only,
  }


def render(payload, quick: bool, device: str) -> str:
  cfg, rows, loss_only = payload["config"], payload["rows"], payload["loss_only"]
  reason = payload["blockwise_note"]
  cached = [r for r in rows if r["method"] != "full"]
  memory_checked = [r for r in cached if r["memory_target_met"] is not None]
  time_checked = [r for r in cached if r["time_target_met"] is not None]
  rounds = ", ".join(f"B={b}: {w}+{n}" for b, (w, n) in cfg["rounds"].items())
  return "\n".join([
      f"# Memory and time of exact large-batch contrastive gradients{' (quick)' if quick else ''}",
      "",
      f"Two towers, each an MLP {' → '.join(map(str, cfg['dims']))} (GELU; "
      f"{cfg['num_params'] / 1e6:.2f}M "
      f"parameters in all), symmetric InfoNCE at temperature {TEMPERATURE}; train step = "
      f"value_and_grad + SGD, jit-compiled, on {device}. Chunks of {cfg['chunk']} rows; "
      f"blockwise loss with "
      f"`block_size={cfg['block_size']}` where B > block_size (below, it is one tile: the "
      "dense loss). *temp*: compiled temporaries "
      "(`memory_analysis().temp_size_in_bytes`, deterministic); *temp / full*: vs the "
      "full-batch step with the same loss. *time / full*: median over interleaved rounds "
      f"(warm-up + recorded: {rounds}) of same-round step-time ratios vs full batch with the "
      "same loss; 95% CI: bootstrap of that median. Targets (cached methods): temp ≤ "
      f"{MEMORY_TARGET:.0%} of full when B / chunk ≥ {MIN_CHUNKS}; time ≤ {TIME_TARGET}× full.",
      "",
      table(rows),
      "",
      f"Memory target met in {sum(r['memory_target_met'] for r in memory_checked)}/"
      f"{len(memory_checked)} applicable rows; time target in "
      f"{sum(r['time_target_met'] for r in time_checked)}/{len(time_checked)}.",
      *([f"Blockwise loss rows: not available ({reason})."] if reason else []),
      *[f"B={r['batch']} {r['method']} ({r['loss']}): {r['note']}." for r in rows if r["note"]],
      "",
      *loss_only_lines(loss_only),
      "",
      *transformer_lines(payload["transformer"]),
  ])


def main():
  args = _common.parse_args(__doc__.splitlines()[0], add_options)
  config = QUICK if args.quick else FULL
  start = time.perf_counter()
  reason = blockwise_status()
  device = f"{_common.environment()['device']} ({jax.default_backend()})"
  if args.section == "transformer":
    if not (args.out / f"{NAME}.json").is_file():
      raise SystemExit(f"--section transformer keeps the MLP section of "
                       f"{args.out / NAME}.json, which does not exist: run the whole "
                       f"benchmark into --out {str(args.out)!r} first")
    previous = json.loads((args.out / f"{NAME}.json").read_text())
    if previous["quick"] != args.quick:
      raise SystemExit(f"{args.out / NAME}.json has quick={previous['quick']}, "
                       f"but this run has quick={args.quick}")
    env = previous["environment"]
    device = f"{env['device']} ({env['backend']})"  # where the MLP section was measured
    keys = ("config", "target", "blockwise_available", "blockwise_note", "rows",
            "loss_only")
    payload = {key: previous[key] for key in keys}
    payload["mlp_wall_s"] = previous.get("mlp_wall_s", previous["wall_s"])
    total = 0
  else:
    total = sum(sum(config["rounds"][b]) for b in config["batches"])
  with tqdm(total=total, desc=NAME, unit="round") as bar:
    if args.section != "transformer":
      payload = measure_mlp(config, reason, bar)
      payload["mlp_wall_s"] = time.perf_counter() - start
    transformer_start = time.perf_counter()
    payload["transformer"] = measure_transformer(config, reason is None, bar)
    payload["transformer"]["wall_s"] = time.perf_counter() - transformer_start

  markdown = render(payload, args.quick, device)
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": args.quick, **payload, "wall_s": time.perf_counter() - start})
  plot(payload["rows"], payload["loss_only"], {"chunk": payload["config"]["chunk"]},
       payload["transformer"], args.out)


if __name__ == "__main__":
  main()
