"""Zeroth-order fine-tuning of a small language model: MeZO, HiZOO, sparse, low rank, sign.

``python benchmarks/zeroth_order_lm.py [--quick]`` writes
``benchmarks/results/zeroth_order_lm.{json,md,png}`` (quick: ``results/quick/``).

**Fine-tuning** (section ``finetune``). A character-level causal transformer (Flax linen,
2 blocks, d = 64, context 64, ~0.1M parameters) is pretrained by backprop (Adam) on the
docstrings of part of Python's standard library (offline and reproducible: the text ships
with the interpreter), then fine-tuned on the docstrings of held-out modules by: backprop
(Adam), MeZO (``gradtx.zo_sgd_step``), Sparse MeZO (``mask=`` from
``gradtx.magnitude_mask`` on the pretrained weights), low-rank ZO (``rank=``, the subspace
kept for ``K`` steps: LOZO), HiZOO (``zeroth_order("hizoo")`` + SGD) and ZO-SGD-Sign
(``zo_sgd_step(sign=True)``, in place like MeZO), at the same budget of forward passes over a batch
(a backprop step counts 3: its forward and a backward of about twice the cost). Each
method's learning rate is the best of a small grid (final held-out loss). Reported: the
held-out loss against forward passes, the passes each method needs to reach the loss MeZO
ends at, and the compiled memory of each method's step.

**Memory and speed of the in-place step** (section ``scaling``). ``zo_sgd_step`` jitted
with donated params against one forward pass and against the materialised one-pair step
(``es_gradient(num_samples=2)`` then SGD, the default mode) on a bias-free MLP
64 → H → 10 whose kernels share one leaf, batch 64, at 1M, 10M and 100M parameters:
``memory_analysis()`` temporaries (compile only at 100M), and step time as paired,
interleaved ratios (``_common.time_interleaved``) where both run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import gradtx  # noqa: E402

NAME = "zeroth_order_lm"
PRETRAIN_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "inspect",
    "io", "itertools", "json", "logging", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "zipfile")
FINETUNE_MODULES = ("unittest", "difflib", "doctest", "email.message", "ftplib", "imaplib",
                    "gettext", "optparse", "smtplib", "mailbox")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # anything else becomes "?"
CONTEXT, WIDTH, DEPTH, HEADS = 64, 64, 2, 4
SIGMA = 1e-3
SCALING_SIZES = (1_000_000, 10_000_000, 100_000_000)
RUN_UP_TO = 10_000_000  # larger sizes are compiled, not run


# --------------------------------------------------------------------------------------
# Data: standard-library docstrings.


def docstrings(module_names) -> str:
  """The module's and its own functions' and classes' docstrings, in name order."""
  texts = []
  for name in module_names:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    texts.append(inspect.getdoc(module) or "")
    for attr, obj in sorted(vars(module).items()):
      if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
        continue
      if inspect.isfunction(obj) or inspect.isclass(obj):
        texts.append(inspect.getdoc(obj) or "")
  return "\n\n".join(t for t in texts if t)


def encode(text: str) -> np.ndarray:
  table = {c: i for i, c in enumerate(VOCAB)}
  unknown = table["?"]
  return np.array([table.get(c, unknown) for c in text], np.int32)


def batches(tokens: np.ndarray, batch: int, seed: int):
  """Endless random windows of ``CONTEXT + 1`` tokens, ``(batch, CONTEXT + 1)``."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, tokens.size - CONTEXT - 1, batch)
    yield np.stack([tokens[s:s + CONTEXT + 1] for s in starts])


# --------------------------------------------------------------------------------------
# The model.


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(4 * WIDTH)(nn.LayerNorm()(x))
    return x + nn.Dense(WIDTH)(nn.gelu(h))


class CharTransformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(len(VOCAB), WIDTH)
    positions = self.param("positions", nn.initializers.normal(0.02), (CONTEXT, WIDTH))
    x = embed(tokens) + positions[: tokens.shape[1]]
    for _ in range(DEPTH):
      x = Block()(x)
    return embed.attend(nn.LayerNorm()(x))  # tied output embedding


MODEL = CharTransformer()


def lm_loss(params, windows):
  logits = MODEL.apply(params, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


# --------------------------------------------------------------------------------------
# Fine-tuning methods: (name, forward passes per step, make(lr) -> (init, step)).


def adam_method(lr):
  tx = optax.adam(lr)

  def step(state, windows, key):
    params, opt = state
    loss, grads = jax.value_and_grad(lm_loss)(params, windows)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), loss

  return lambda params: (params, tx.init(params)), step


def mezo_method(lr, **kw):
  def step(state, windows, key):
    params, count = state
    extra = {}
    if "resample_every" in kw:  # LOZO: the subspace key changes every K steps
      extra = dict(rank=kw["rank"], subspace_key=jax.random.fold_in(
          jax.random.key(99), count // kw["resample_every"]))
    elif "mask" in kw:
      extra = dict(mask=kw["mask"])
    params, loss = gradtx.zo_sgd_step(lambda p: lm_loss(p, windows), params, key,
                                      sigma=SIGMA, learning_rate=lr,
                                      sign=kw.get("sign", False), **extra)
    return (params, count + 1), loss

  return lambda params: (params, jnp.zeros((), jnp.int32)), step


def chain_method(lr, estimator, **kw):
  tx = optax.chain(gradtx.zeroth_order(estimator, key=jax.random.key(7), sigma=SIGMA, **kw),
                   optax.sgd(lr))

  def step(state, windows, key):
    params, opt = state
    loss_fn = lambda p: lm_loss(p, windows)
    updates, opt = tx.update(params, opt, params, loss_fn=loss_fn)
    return (optax.apply_updates(params, updates), opt), jnp.zeros(())  # no extra pass

  return lambda params: (params, tx.init(params)), step


def methods(pretrained, quick):
  mask = gradtx.magnitude_mask(0.25)(pretrained)
  zo_lrs = (1e-4,) if quick else (3e-5, 1e-4, 3e-4)
  return [
      ("backprop (Adam)", 3, (1e-3,) if quick else (3e-4, 1e-3), adam_method),
      ("MeZO", 2, zo_lrs, mezo_method),
      ("Sparse MeZO (25%, magnitude)", 2, zo_lrs,
       functools.partial(mezo_method, mask=mask)),
      ("LOZO (rank 4, K = 50)", 2, zo_lrs,
       functools.partial(mezo_method, rank=4, resample_every=50)),
      ("HiZOO (α = 1e-6)", 3, zo_lrs,
       functools.partial(chain_method, estimator="hizoo", alpha=1e-6, num_samples=2)),
      ("ZO-SGD-Sign", 2, (1e-4,) if quick else (1e-4, 3e-4),
       functools.partial(mezo_method, sign=True)),
  ]


def finetune(pretrained, train, evaluate, budget, make, per_step, lr, points):
  """``(passes, held-out losses)`` at ``points`` evaluations over ``budget`` passes."""
  init, step = make(lr)
  step = jax.jit(step, donate_argnums=0)
  state = init(jax.tree.map(jnp.copy, pretrained))
  steps = budget // per_step
  every = max(1, steps // points)
  keys = jax.random.split(jax.random.key(1), steps)
  passes, losses = [0], [float(evaluate(pretrained))]
  start, timed = 0.0, 0.0
  for t in range(steps):
    if t == 1:  # after the first step, which compiles
      start = time.perf_counter()
    state, _ = step(state, next(train), keys[t])
    if (t + 1) % every == 0 or t + 1 == steps:
      jax.block_until_ready(state)
      pause = time.perf_counter()
      passes.append((t + 1) * per_step)
      losses.append(float(evaluate(state[0])))
      timed += time.perf_counter() - pause  # evaluation is not the step's time
  jax.block_until_ready(state)
  return passes, losses, (time.perf_counter() - start - timed) / max(steps - 1, 1)


def step_memory(pretrained, make, windows):
  """Compiled temporaries of one step (donated state), bytes."""
  init, step = make(1e-4)
  state = init(pretrained)
  compiled = jax.jit(step, donate_argnums=0).lower(state, windows, jax.random.key(0)).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def run_finetune(quick: bool) -> dict:
  pre_tokens = encode(docstrings(PRETRAIN_MODULES))
  ft_tokens = encode(docstrings(FINETUNE_MODULES))
  split = int(0.9 * ft_tokens.size)
  ft_train, ft_eval = ft_tokens[:split], ft_tokens[split:]
  batch = 16
  eval_windows = jnp.asarray(next(batches(ft_eval, 8 if quick else 64, seed=123)))
  evaluate = jax.jit(lambda p: lm_loss(p, eval_windows))
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
  pre_steps = 30 if quick else 1500
  init, step = adam_method(3e-3)
  step = jax.jit(step, donate_argnums=0)
  state, data = init(params), batches(pre_tokens, 32, seed=0)
  for t in tqdm(range(pre_steps), desc="pretrain (Adam)", leave=False):
    state, _ = step(state, jnp.asarray(next(data)), jax.random.key(t))
  pretrained = state[0]
  budget = 120 if quick else 4_000
  windows = jnp.asarray(next(batches(ft_train, batch, seed=5)))
  rows = []
  grid = methods(pretrained, quick)
  bar = tqdm(total=sum(len(lrs) for _, _, lrs, _ in grid), desc="fine-tune", leave=False)
  for name, per_step, lrs, make in grid:
    best = None
    for lr in lrs:
      train = (jnp.asarray(w) for w in batches(ft_train, batch, seed=7))
      passes, losses, seconds = finetune(pretrained, train, evaluate, budget, make,
                                         per_step, lr, 6 if quick else 40)
      bar.update()
      if np.isfinite(min(losses)) and (best is None or min(losses) < min(best["losses"])):
        best = dict(lr=lr, passes=passes, losses=losses, seconds_per_step=seconds)
    if best is None:
      best = dict(lr=None, passes=[0], losses=[float("nan")], seconds_per_step=float("nan"))
    rows.append(dict(method=name, passes_per_step=per_step, **best,
                     temp_bytes=step_memory(pretrained, make, windows)))
  bar.close()
  forward = jax.jit(lm_loss).lower(pretrained, windows).compile().memory_analysis()
  return dict(
      pretrain_tokens=int(pre_tokens.size), finetune_tokens=int(ft_tokens.size),
      num_params=int(sum(x.size for x in jax.tree.leaves(pretrained))),
      pretrain_steps=pre_steps, budget=budget, batch=batch,
      pretrained_eval_loss=rows[0]["losses"][0], forward_temp_bytes=int(forward.temp_size_in_bytes),
      param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(pretrained))), rows=rows,
      _pretrained=pretrained, _windows=windows)


# --------------------------------------------------------------------------------------
# The in-place step at 1M, 10M and 100M parameters.


def packed_mlp(num_params: int, batch: int = 64):
  hidden = round(num_params / 74)

  def loss(p, x):
    logits = jax.nn.relu(x @ p["w"][:64]) @ p["w"][64:].T / hidden**0.5
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

  return loss, {"w": jax.ShapeDtypeStruct((74, hidden), jnp.float32)}, hidden


def scaling_steps(loss, x):
  def inplace(p, k):
    return gradtx.zo_sgd_step(lambda q: loss(q, x), p, k, sigma=SIGMA, learning_rate=1e-3)

  def materialised(p, k):
    g = gradtx.es_gradient(lambda q: loss(q, x), p, k, sigma=SIGMA, num_samples=2)
    return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), loss(p, x)

  return {"zo_sgd_step (in place)": inplace, "materialised (default)": materialised}


def lm_timing(pretrained, windows, repeats):
  """The in-place step against the materialised one on the language model (paired)."""
  steps = scaling_steps(lambda p, w: lm_loss(p, w), windows)
  timing = time_steps(steps, {m: jax.tree.map(jnp.copy, pretrained) for m in steps}, repeats)
  for mode, fn in steps.items():
    compiled = jax.jit(fn, donate_argnums=0).lower(pretrained, jax.random.key(0)).compile()
    timing[mode]["temp"] = int(compiled.memory_analysis().temp_size_in_bytes)
  return timing


def run_scaling(quick: bool) -> list[dict]:
  sizes = (1_000_000,) if quick else SCALING_SIZES
  out = []
  for n in tqdm(sizes, desc="scaling", leave=False):
    loss, params, _ = packed_mlp(n)
    x_shape = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    forward = jax.jit(loss).lower(params, x_shape).compile().memory_analysis()
    row = dict(num_params=int(np.prod(params["w"].shape)), param_bytes=int(
        np.prod(params["w"].shape) * 4), forward_temp=int(forward.temp_size_in_bytes),
        executed=n <= RUN_UP_TO, modes={})
    x = jax.random.normal(jax.random.key(1), (64, 64))
    steps = scaling_steps(loss, x)
    for mode, fn in steps.items():
      compiled = jax.jit(fn, donate_argnums=0).lower(params, jax.random.key(0)).compile()
      row["modes"][mode] = dict(temp=int(compiled.memory_analysis().temp_size_in_bytes))
    if row["executed"]:
      state = {m: {"w": jnp.full(params["w"].shape, 0.01, jnp.float32)} for m in steps}
      row["timing"] = time_steps(steps, state, repeats=3 if quick else 21)
    out.append(row)
  return out


def time_steps(steps, state, repeats):
  """Paired, interleaved seconds per step (each mode updates its own donated ``state``)."""
  jitted = {m: jax.jit(fn, donate_argnums=0) for m, fn in steps.items()}
  keys = iter(jax.random.split(jax.random.key(2), 1000))

  def runner(mode):
    def run():
      state[mode], value = jitted[mode](state[mode], next(keys))
      return value
    return run

  times = _common.time_interleaved({m: runner(m) for m in steps}, repeats=repeats)
  base = times["materialised (default)"]
  return {m: dict(median_s=float(np.median(t)),
                  speed_vs_default=_common.paired_ratio(base, t)) for m, t in times.items()}


# --------------------------------------------------------------------------------------
# Report.


def mib(b):
  return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def passes_to(passes, losses, target):
  for p, v in zip(passes, losses, strict=True):
    if v <= target:
      return p
  return None


def report(ft: dict, scaling: list[dict], load: tuple[float, float], quick: bool) -> str:
  mezo = next(r for r in ft["rows"] if r["method"] == "MeZO")
  target = min(mezo["losses"])
  rows = []
  for r in ft["rows"]:
    reach = passes_to(r["passes"], r["losses"], target)
    rows.append([r["method"], r["passes_per_step"], "—" if r["lr"] is None else f"{r['lr']:g}",
                 f"{r['losses'][-1]:.3f}", f"{min(r['losses']):.3f}",
                 "not reached" if reach is None else f"{reach:,}",
                 mib(r["temp_bytes"]), f"{r['temp_bytes'] / ft['forward_temp_bytes']:.2f}",
                 f"{1e3 * r['seconds_per_step']:.1f}"])
  lines = [
      "# Zeroth-order fine-tuning of a character-level transformer",
      "",
      f"CPU (shared; 1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
      f"end){' — quick run' if quick else ''}. Model: causal transformer, {DEPTH} blocks, "
      f"d = {WIDTH}, {HEADS} heads, context {CONTEXT}, {ft['num_params']:,} parameters; "
      f"pretrained by Adam ({ft['pretrain_steps']} steps, batch 32) on "
      f"{ft['pretrain_tokens']:,} characters of standard-library docstrings, fine-tuned on "
      f"{ft['finetune_tokens']:,} characters of held-out modules "
      f"({', '.join(FINETUNE_MODULES)}; 90% train, held-out loss on the last 10%). Budget: "
      f"{ft['budget']:,} forward passes of a batch of {ft['batch']} windows per method "
      f"(backprop: 3 per step); σ = {SIGMA:g}; each method's learning rate is the best of "
      f"its grid by the best held-out loss along the run (early stopping). "
      f"Pretrained held-out loss: {ft['pretrained_eval_loss']:.3f} nats/char.",
      "",
      _common.markdown_table(
          ["method", "passes / step", "lr", "final held-out loss", "best", "passes to MeZO's "
           "best loss", "step temp memory", "temp / forward", "ms / step"], rows),
      "",
      f"Step memory: `memory_analysis()` of the jitted step with the state donated; one "
      f"forward pass needs {mib(ft['forward_temp_bytes'])} of temporaries, the parameters "
      f"are {mib(ft['param_bytes'])}.",
      "",
      "## The in-place step: memory and speed (bias-free MLP 64 → H → 10, one leaf, batch 64)",
      "",
  ]
  srows = []
  for r in scaling:
    budget = r["forward_temp"] + r["param_bytes"]
    for mode, m in r["modes"].items():
      timing = r.get("timing", {}).get(mode)
      srows.append([f"{r['num_params']:,}", mode, mib(m["temp"]), mib(r["forward_temp"]),
                    f"{m['temp'] / budget:.3f}", f"{m['temp'] - budget:,} B",
                    _common.fmt_ratio(timing and timing["speed_vs_default"], 2)
                    if timing else "compile only",
                    _common.fmt_ci(timing and timing["speed_vs_default"], 2) if timing else "—"])
  lines += [
      _common.markdown_table(["params", "step", "temp", "forward temp",
                              "temp / (forward + params)", "temp − (forward + params)",
                              "speed vs default", "95% CI"], srows),
      "",
      "Target: `zo_sgd_step`'s temporaries ≤ one forward pass's + one parameter-sized "
      "buffer (ratio ≤ 1), and its speed ≥ 0.8× the materialised step where both run. "
      "speed vs default: median over interleaved rounds of t(default) / t(step). The "
      "noise is a counter hash of each entry's index, drawn inside the pass that uses it "
      "(no generator state, never stored): the in-place step's bytes beyond one forward "
      "pass and one parameter buffer are its scalars (the two losses, the hash seeds, the "
      "learning rate).",
      "",
      "On the language model above (batch 16 × 64 characters), the same two steps:",
      "",
      _common.markdown_table(
          ["step", "temp", "ms / step", "speed vs default", "95% CI"],
          [[m, mib(t["temp"]), f"{1e3 * t['median_s']:.1f}",
            _common.fmt_ratio(t["speed_vs_default"], 2), _common.fmt_ci(t["speed_vs_default"], 2)]
           for m, t in ft["lm_timing"].items()]),
  ]
  return "\n".join(lines)


def plot(ft: dict, scaling: list[dict], out: Path) -> None:
  plt = _common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in ft["rows"]:
    left.plot(r["passes"], r["losses"], label=f"{r['method']} (lr {r['lr']:g})"
              if r["lr"] else r["method"])
  left.set_xlabel("forward passes (backprop step = 3)")
  left.set_ylabel("held-out loss (nats / char)")
  left.set_title("fine-tuning at equal forward-pass budgets")
  left.legend(fontsize=8)
  sizes = [r["num_params"] for r in scaling]
  right.plot(sizes, [r["forward_temp"] / 2**20 for r in scaling], "k--", label="one forward pass")
  right.plot(sizes, [(r["forward_temp"] + r["param_bytes"]) / 2**20 for r in scaling], "k:",
             label="forward + one parameter buffer (target)")
  for mode in scaling[0]["modes"]:
    right.plot(sizes, [r["modes"][mode]["temp"] / 2**20 for r in scaling], "o-", label=mode)
  right.set_xscale("log")
  right.set_yscale("log")
  right.set_xlabel("parameters")
  right.set_ylabel("compiled temporaries (MiB)")
  right.set_title("memory of one ZO-SGD step")
  right.legend(fontsize=8)
  _common.save_figure(fig, out, NAME)


def main() -> None:
  args = _common.parse_args(__doc__.splitlines()[0], name=NAME)
  start_load = os.getloadavg()[0]
  ft = run_finetune(args.quick)
  ft["lm_timing"] = lm_timing(ft.pop("_pretrained"), ft.pop("_windows"),
                              repeats=5 if args.quick else 30)
  scaling = run_scaling(args.quick)
  load = (start_load, os.getloadavg()[0])
  markdown = report(ft, scaling, load, args.quick)
  _common.write_results(args.out, NAME, payload=dict(quick=args.quick, load_average=load,
                                                    finetune=ft, scaling=scaling),
                        markdown=markdown)
  plot(ft, scaling, args.out)


if __name__ == "__main__":
  main()
