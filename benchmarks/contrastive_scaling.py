"""Ring-sharded vs all-gathered contrastive losses; SigLIP vs InfoNCE on digits.

Claims (issue #16):

1. *Memory and FLOPs* (compile-only, never executed): on 8 virtual CPU devices, at
   global B = 2^16, 2^18, 2^20 and d = 512, the ring losses' ``value_and_grad`` (w.r.t.
   this device's rows) needs ≤ 2 GiB of temporaries per device at B = 2^20 (the
   all-gathered representations alone are 2 × 2 GiB there) and ≈ 1/n of the all-gather
   variant's per-device FLOPs. Variants: ``all_gather`` (every device gathers ``a`` and
   ``b`` and computes the whole blockwise loss, ``block_size=1024``, as
   ``sharded_cached_value_and_grad(loss_comm="all_gather")`` does) and ``ring``
   (``axis_name=``, ``block_size=1024``), for symmetric InfoNCE, SigLIP and NT-Xent
   (``z1``, ``z2`` of B/2 rows each: the same B × B scores). Memory is
   ``memory_analysis().temp_size_in_bytes`` of the compiled per-device program; FLOPs
   are the tile matmuls the code does per device, counted analytically (XLA's
   ``cost_analysis`` counts a loop body once, not once per iteration), multiply-adds × 2:
   one ``rows × cols × d`` product per tile forward; backward 3 (the scores again,
   ``q̄``, ``k̄``), 2 for NT-Xent (``k`` is ``q``: no ``k̄``). The symmetric InfoNCE's two
   directions share the tiles (one pass, one ring).
2. *Time* (executed, 4 virtual CPU devices of this machine, B = 4096, d = 128): ring vs
   all-gather step time, a paired ratio of interleaved rounds in one process.
3. *Quality*: SigLIP vs InfoNCE (equal steps, equal encoder, Adam) on a two-view task on
   sklearn's digits (views: Gaussian pixel noise and random pixel dropout); a linear probe
   (logistic regression) on the frozen representations, test accuracy; loss curves.

Each device count runs in a subprocess of its own (``XLA_FLAGS`` must be set before jax
is imported). ``--quick``: B = 2^12, 2^14 (compile-only), 1024 (timed), 60 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "contrastive_scaling"
GIB = 2**30
LOSSES = ("info_nce", "siglip", "nt_xent")  # compile-only rows; timed: the first two


# ------------------------------------------------------------------ device workers


def _sharded_step(loss_name, comm, block):
  """``value_and_grad`` w.r.t. this device's rows of ``a`` and ``b``, inside shard_map."""
  import jax
  import jax.numpy as jnp

  import gradtx

  def loss(a, b, axis_name):
    kw = dict(temperature=0.1, block_size=block, axis_name=axis_name)
    if loss_name == "siglip":
      return gradtx.sigmoid_contrastive(a, b, bias=-10.0, **kw)
    if loss_name == "nt_xent":
      return gradtx.nt_xent(a, b, **kw)
    return gradtx.info_nce(a, b, **kw)

  def per_device(a, b):
    if comm == "ring":
      return jax.value_and_grad(lambda a, b: loss(a, b, "data"), argnums=(0, 1))(a, b)
    local = a.shape[0]
    gather = lambda x: jax.lax.all_gather(x, "data", axis=0, tiled=True)
    value, (ga, gb) = jax.value_and_grad(lambda a, b: loss(a, b, None), argnums=(0, 1))(
        gather(a), gather(b))
    own = lambda g: jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index("data") * local,
                                                 local)
    return value, (own(ga), own(gb))

  return per_device, jnp


def _compiled(loss_name, comm, block, batch, dim, mesh):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  per_device, jnp = _sharded_step(loss_name, comm, block)
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                             out_specs=(P(), (P("data"), P("data"))), check_vma=False))
  rows = batch // 2 if loss_name == "nt_xent" else batch  # two views of B/2 samples
  shape = jax.ShapeDtypeStruct((rows, dim), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
  return fn, fn.lower(shape, shape).compile()


def _flops(loss_name, comm, batch, dim, n):
  """Tile matmul FLOPs per device: 1 forward + 3 backward products per tile (2 for
  NT-Xent); the symmetric InfoNCE's two directions share the tiles."""
  products = 3 if loss_name == "nt_xent" else 4
  rows = batch // n if comm == "ring" else batch
  return products * 2 * rows * batch * dim


def worker_memory(batches, dim, block):
  import jax

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  records = []
  for batch in batches:
    for loss_name in LOSSES:
      for comm in ("all_gather", "ring"):
        _, compiled = _compiled(loss_name, comm, block, batch, dim, mesh)
        memory = compiled.memory_analysis()
        records.append({"batch": batch, "loss": loss_name, "comm": comm, "devices": n,
                        "temp_bytes": int(memory.temp_size_in_bytes),
                        "argument_bytes": int(memory.argument_size_in_bytes),
                        "flops_per_device": _flops(loss_name, comm, batch, dim, n)})
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
  return records


def worker_time(batch, dim, block, repeats):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  r = np.random.default_rng(0)
  a, b = (jax.device_put(r.standard_normal((batch, dim)).astype(np.float32),
                         NamedSharding(mesh, P("data"))) for _ in range(2))
  fns, values = {}, {}
  for loss_name in ("info_nce", "siglip"):
    for comm in ("all_gather", "ring"):
      fn, _ = _compiled(loss_name, comm, block, batch, dim, mesh)
      fns[f"{loss_name}/{comm}"] = lambda fn=fn: fn(a, b)
      values[f"{loss_name}/{comm}"] = fn(a, b)
  times = _common.time_interleaved(fns, repeats=repeats, warmup=1)
  out = {"batch": batch, "dim": dim, "devices": n, "block": block}
  for loss_name in ("info_nce", "siglip"):
    ring, gather = values[f"{loss_name}/ring"], values[f"{loss_name}/all_gather"]
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(ring), jax.tree.leaves(gather), strict=True))
    out[loss_name] = {
        "ratio": _common.paired_ratio(times[f"{loss_name}/ring"],
                                      times[f"{loss_name}/all_gather"]),
        "ring_s": float(np.median(times[f"{loss_name}/ring"])),
        "all_gather_s": float(np.median(times[f"{loss_name}/all_gather"])),
        "max_abs_diff": diff,
    }
  return out


def _run_worker(devices, task, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(
      {"task": task, **kwargs})]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode:
    raise RuntimeError(f"worker {task} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- quality


def quality(steps, seed=0):
  """SigLIP vs InfoNCE on digits two views; linear-probe test accuracy and loss curves."""
  import jax
  import jax.numpy as jnp
  import optax
  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import train_test_split

  import gradtx

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
  batch = 256

  def encode(p, v):
    return jnp.tanh(v @ p["w1"] + p["b1"]) @ p["w2"]

  def view(key, v):
    k1, k2 = jax.random.split(key)
    keep = jax.random.bernoulli(k1, 0.8, v.shape)
    return jnp.where(keep, v, 0.0) + 0.1 * jax.random.normal(k2, v.shape)

  losses = {
      "info_nce": lambda p, h1, h2: gradtx.info_nce(h1, h2, temperature=jnp.exp(p["log_t"])),
      "siglip": lambda p, h1, h2: gradtx.sigmoid_contrastive(
          h1, h2, temperature=jnp.exp(-p["t_prime"]), bias=p["bias"]),
  }
  results = {}
  for name, loss_fn in losses.items():
    layers = _common.init_dense(np.random.default_rng(seed), [64, 256, 64], ["l1", "l2"])
    params = {"w1": layers["l1"]["kernel"], "b1": layers["l1"]["bias"],
              "w2": layers["l2"]["kernel"]}
    params.update({"log_t": jnp.log(0.1)} if name == "info_nce" else
                  {"t_prime": jnp.log(10.0), "bias": jnp.float32(-10.0)})
    tx = optax.adam(3e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key, loss_fn=loss_fn, tx=tx):
      k_idx, k1, k2 = jax.random.split(key, 3)
      v = jnp.asarray(x_train)[jax.random.choice(k_idx, len(x_train), (batch,), replace=False)]
      loss, g = jax.value_and_grad(lambda p: loss_fn(p, encode(p, view(k1, v)),
                                                     encode(p, view(k2, v))))(params)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    curve = []
    key = jax.random.key(seed)
    for i in tqdm(range(steps), desc=f"quality {name}", leave=False):
      params, state, loss = step(params, state, jax.random.fold_in(key, i))
      curve.append(float(loss))
    feats = lambda v, params=params: np.asarray(encode(params, jnp.asarray(v)))
    probe = LogisticRegression(max_iter=2000).fit(feats(x_train), y_train)
    results[name] = {"probe_accuracy": float(probe.score(feats(x_test), y_test)),
                     "loss_curve": curve}
  raw = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_test, y_test)
  results["raw_pixels_probe_accuracy"] = float(raw)
  return results


# ------------------------------------------------------------------------------- main


def _target_line(memory):
  """The ring's temporaries at the largest B against the 2 GiB target, per loss."""
  largest = max(r["batch"] for r in memory)
  ring = [r for r in memory if r["batch"] == largest and r["comm"] == "ring"]
  verdicts = [f"{r['loss']} {r['temp_bytes'] / GIB:.3f} GiB "
              f"({'yes' if r['temp_bytes'] <= 2 * GIB else '**no**'})" for r in ring]
  return (f"Ring temporaries ≤ 2 GiB per device at B = 2^{int(np.log2(largest))}: "
          + ", ".join(verdicts) + ".")


def _plot(memory, quality_results, out_dir):
  plt = _common.pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (loss_name, marker) in enumerate(zip(LOSSES, "os^", strict=True)):
    for comm, style in (("all_gather", "--"), ("ring", "-")):
      pts = [(r["batch"], r["temp_bytes"] / GIB) for r in memory
             if r["loss"] == loss_name and r["comm"] == comm]
      # Hollow markers of decreasing size: equal values (InfoNCE, SigLIP) stay visible.
      ax.plot(*zip(*pts, strict=True), style, marker=marker, color=f"C{i}",
              markersize=10 - 2 * i, markerfacecolor="none", label=f"{loss_name}, {comm}")
  ax.axhline(2, color="gray", lw=0.8, ls=":", label="2 GiB target")
  ax.set(xscale="log", yscale="log", xlabel="global batch B", title=(
      f"per-device temporaries, loss + gradient ({memory[0]['devices']} devices, d = 512)"),
      ylabel="GiB")
  ax.legend(fontsize=8)
  for name, res in quality_results.items():
    if isinstance(res, dict):
      ax2.plot(res["loss_curve"], label=f"{name} (probe {res['probe_accuracy']:.3f})")
  ax2.set(xlabel="step", ylabel="training loss", title="digits, two views: loss curves")
  ax2.legend(fontsize=8)
  _common.save_figure(fig, out_dir, NAME)


def main():
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[2])
    task = spec.pop("task")
    result = worker_memory(**spec) if task == "memory" else worker_time(**spec)
    print(json.dumps(result))
    return
  args = _common.parse_args(__doc__.splitlines()[0], name=NAME)
  batches = [2**12, 2**14] if args.quick else [2**16, 2**18, 2**20]
  block = 256 if args.quick else 1024
  load = os.getloadavg()
  with tqdm(total=3, desc=NAME) as bar:
    memory = _run_worker(8, "memory", batches=batches, dim=512, block=block)
    bar.update()
    timing = _run_worker(4, "time", batch=1024 if args.quick else 4096, dim=128,
                         block=256 if args.quick else 1024, repeats=3 if args.quick else 7)
    bar.update()
    qual = quality(60 if args.quick else 400)
    bar.update()
  load_after = os.getloadavg()

  rows = []
  for r in memory:
    base = next(m for m in memory if m["batch"] == r["batch"] and m["loss"] == r["loss"]
                and m["comm"] == "all_gather")
    rows.append([f"2^{int(np.log2(r['batch']))}", r["loss"], r["comm"],
                 f"{r['temp_bytes'] / GIB:.3f}", f"{r['flops_per_device'] / 1e12:.2f}",
                 f"{r['flops_per_device'] / base['flops_per_device']:.3f}"])
  md = [f"# {NAME}", "",
        f"Load average {load[0]:.2f} before, {load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs).", "",
        "## Per-device memory and FLOPs (compile-only, 8 virtual CPU devices, d = 512, "
        f"block {block})", "",
        _common.markdown_table(["B", "loss", "comm", "temporaries GiB", "TFLOP/device",
                                "FLOPs vs all_gather"], rows), "",
        _target_line(memory), "",
        f"## Step time, executed ({timing['devices']} virtual CPU devices, "
        f"B = {timing['batch']}, d = {timing['dim']}, block {timing['block']})", "",
        _common.markdown_table(
            ["loss", "ring s", "all_gather s", "ring / all_gather", "95% CI", "max |Δ|"],
            [[name, f"{timing[name]['ring_s']:.3f}", f"{timing[name]['all_gather_s']:.3f}",
              _common.fmt_ratio(timing[name]["ratio"]), _common.fmt_ci(timing[name]["ratio"]),
              f"{timing[name]['max_abs_diff']:.1e}"] for name in ("info_nce", "siglip")]), "",
        "## Quality: digits two views, linear probe (equal steps)", "",
        _common.markdown_table(
            ["loss", "probe test accuracy", "final loss"],
            [[name, f"{qual[name]['probe_accuracy']:.3f}",
              f"{np.mean(qual[name]['loss_curve'][-20:]):.3f}"]
             for name in ("info_nce", "siglip")]
            + [["raw pixels (no encoder)", f"{qual['raw_pixels_probe_accuracy']:.3f}", "—"]])]
  _common.write_results(args.out, NAME, payload={
      "quick": args.quick, "memory": memory, "timing": timing, "quality": qual,
      "load_average": [load, load_after]}, markdown="\n".join(md))
  _plot(memory, qual, args.out)


if __name__ == "__main__":
  main()
