"""gradtx at pod scale, by simulation: compiled memory and collective bytes per device.

Claims (issue #15), for 8, 64 and 256 virtual CPU devices (one subprocess per count,
``--xla_force_host_platform_device_count``); every program is AOT-compiled from abstract
``jax.ShapeDtypeStruct`` inputs (``jax.jit(f).lower(...).compile()``), never run, so
nothing is allocated:

1. ``contrastive``: ``sharded_cached_value_and_grad`` (two towers, one linear+tanh
   encoder each, ``info_nce`` with ``block_size``) at global batch B up to 1,048,576,
   representations of width d. Collectives per step: one all-gather of ``B × d`` per
   representation leaf (2 leaves), one all-reduce of the ``|θ|`` encoder gradients.
2. ``es``: ``es_gradient`` with the population over the mesh (``mesh=``, ``axis_name=``),
   N = 4n antithetic members on a ``|θ|``-parameter model: one all-gather of the N
   fitness values, one all-reduce of the ``|θ|`` weighted noise sum.
3. ``clip_adam``: ``optax.chain(gradtx.clip_by_global_norm(1.0), optax.adam(1e-3))`` and
   the parameter update, on 1,073,741,824 (2^30) FSDP-sharded float32 parameters (16
   leaves of 8192 × 8192, each split along axis 0 over all devices): the clip adds one
   scalar all-reduce (the squared norm's partial sums; XLA sends the 16 leaves' sums as
   one tuple, 64 bytes) and nothing else; a second one sits in the branch that rescales
   an overflowing or underflowing sum of squares, taken only then.

Per device: ``memory_analysis()`` of the compiled program (arguments, outputs,
temporaries) and, read from the compiled HLO text, every all-gather, all-reduce,
reduce-scatter and collective-permute with the bytes of its result (all-gather: the
gathered array each device ends with; all-reduce: the reduced array), summed per kind.
The formulas above are checked (the script fails if a count or a byte total differs).

Sizes: B = 2^14, 2^17, 2^20 at 8, 64, 256 devices (2048, 2048, 4096 local rows), d = 256,
inputs 512 wide, chunk 256, ``block_size`` 1024; ES on 2^20 parameters (lean, one member
at a time per device); chosen so that the 256-device compiles take minutes on 2 cores.
``--quick``: 8 devices only, B = 4096, ES on 2^14 parameters, clip/Adam on 2^24.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "scaling"
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
          "pred": 1, "s8": 1, "u8": 1}
_OP = re.compile(r"=\s+(.+?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """``{kind: {"count", "bytes", "count_in_cond"}}`` of the collectives in compiled HLO.

  The bytes are those of each op's result (a tuple's elements summed); the ``-start`` half
  of an async pair is counted, its ``-done`` half is not. Ops inside a ``lax.cond``
  branch (by their ``op_name`` metadata) run only when that branch is taken: they are
  counted apart (``count_in_cond``), not in ``count`` and ``bytes``.
  """
  out = {k: {"count": 0, "bytes": 0, "count_in_cond": 0} for k in KINDS}
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    if "/cond/" in line:  # in a branch of a lax.cond: runs only when its branch is taken
      out[m.group(2)]["count_in_cond"] += 1
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):  # async start: its result tuple repeats the operand; keep the last
      shapes = shapes[-1:]
    size = sum(_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
               for t, dims in shapes)
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += size
  return out


# ------------------------------------------------------------------ the device worker

def _sds(shape, mesh, spec, dtype=np.float32):
  import jax
  from jax.sharding import NamedSharding

  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _measure(fn, *args):
  import jax

  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  return {"argument_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "collectives": collectives(compiled.as_text()),
          "compile_s": time.perf_counter() - start}


def contrastive(n, batch, dim, width, chunk, block):
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import gradtx

  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def encode(p, x, rng):
    del rng
    return {"a": jnp.tanh(x["a"] @ p["wa"]), "b": jnp.tanh(x["b"] @ p["wb"])}

  def loss(p, h):
    return gradtx.info_nce(h["a"], h["b"], temperature=p["tau"], block_size=block)

  f = gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=chunk)
  params = {"wa": _sds((width, dim), mesh, P()), "wb": _sds((width, dim), mesh, P()),
            "tau": _sds((), mesh, P())}
  inputs = {k: _sds((batch, width), mesh, P("data")) for k in ("a", "b")}
  record = _measure(f, params, inputs)
  theta = 2 * width * dim + 1
  record["expected"] = {"all-gather": {"count": 2, "bytes": 2 * batch * dim * 4},
                        "all-reduce": {"bytes": theta * 4}}
  return record


def es(n, num_params, hidden):
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import gradtx

  mesh = jax.make_mesh((n,), ("pop",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = num_params // hidden
  x = np.linspace(-1.0, 1.0, 4 * rows, dtype=np.float32).reshape(4, rows)

  def fn(p):
    return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

  num_samples = 4 * n

  def estimate(p, key):
    return gradtx.es_gradient(fn, p, key, sigma=0.01, num_samples=num_samples,
                              mesh=mesh, axis_name="pop", lean=True)

  params = {"w": _sds((rows, hidden), mesh, P())}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=jax.sharding.NamedSharding(mesh, P()))
  record = _measure(estimate, params, key)
  record["expected"] = {"all-gather": {"count": 1, "bytes": num_samples * 4},
                        "all-reduce": {"bytes": num_params * 4}}
  record["num_samples"] = num_samples
  return record


def clip_adam(n, leaves, side):
  import jax
  import optax
  from jax.sharding import PartitionSpec as P

  import gradtx

  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  tx = optax.chain(gradtx.clip_by_global_norm(1.0), optax.adam(1e-3))
  params = {f"layer_{i:02d}": _sds((side, side), mesh, P("fsdp")) for i in range(leaves)}
  state = jax.eval_shape(tx.init, params)
  state = jax.tree.map(
      lambda s: _sds(s.shape, mesh, P("fsdp") if s.ndim else P(), s.dtype), state)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  record = _measure(step, params, state, params)
  record["expected"] = {"all-reduce": {"bytes": 4 * leaves, "count": 1, "count_in_cond": 1},
                        "all-gather": {"count": 0}}
  return record


def worker(spec):
  import jax

  n = jax.device_count()
  out = {"devices": n}
  out["contrastive"] = contrastive(n, **spec["contrastive"])
  out["es"] = es(n, **spec["es"])
  out["clip_adam"] = clip_adam(n, **spec["clip_adam"])
  return out


def _run_worker(n, spec):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode:
    raise RuntimeError(f"worker for {n} devices failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ checks, table, plot

def check(record) -> list[str]:
  """The formulas of the docs against the compiled HLO; the list of mismatches."""
  bad = []
  n = record["devices"]
  for name in ("contrastive", "es"):
    got, want = record[name]["collectives"], record[name]["expected"]
    if {k: got["all-gather"][k] for k in want["all-gather"]} != want["all-gather"]:
      bad.append(f"{name} @ {n}: all-gather {got['all-gather']} != {want['all-gather']}")
    if got["all-reduce"]["bytes"] < want["all-reduce"]["bytes"] or (
        got["all-reduce"]["bytes"] > want["all-reduce"]["bytes"] + 64):
      bad.append(f"{name} @ {n}: all-reduce {got['all-reduce']} vs "
                 f"{want['all-reduce']['bytes']} (+ at most a few scalars)")
  got, want = record["clip_adam"]["collectives"], record["clip_adam"]["expected"]
  if got["all-gather"]["count"] or got["reduce-scatter"]["count"] or (
      got["collective-permute"]["count"]):
    bad.append(f"clip_adam @ {n}: unexpected collectives {got}")
  if got["all-reduce"] != want["all-reduce"]:
    bad.append(f"clip_adam @ {n}: all-reduce {got['all-reduce']} != {want['all-reduce']}")
  return bad


def _mib(x):
  return f"{x / 2**20:,.1f}"


def _clip_params(spec):
  return spec["clip_adam"]["leaves"] * spec["clip_adam"]["side"] ** 2


def _table(records, spec_of):
  rows = []
  for r in records:
    n = r["devices"]
    spec = spec_of(n)
    for name, what in (("contrastive", f"B={spec['contrastive']['batch']:,}, "
                                       f"d={spec['contrastive']['dim']}"),
                       ("es", f"N={r['es']['num_samples']}, "
                              f"|θ|={spec['es']['num_params']:,}"),
                       ("clip_adam", f"|θ|={_clip_params(spec):,}")):
      m, c = r[name], r[name]["collectives"]
      in_cond = sum(v["count_in_cond"] for v in c.values())
      rows.append([n, name, what, _mib(m["argument_bytes"]), _mib(m["temp_bytes"]),
                   _mib(m["output_bytes"]),
                   f"{c['all-gather']['count']} × / {c['all-gather']['bytes']:,} B",
                   f"{c['all-reduce']['count']} × / {c['all-reduce']['bytes']:,} B",
                   c["reduce-scatter"]["count"] + c["collective-permute"]["count"], in_cond,
                   f"{m['compile_s']:.0f}"])
  return _common.markdown_table(
      ["devices", "program", "size", "args MiB/dev", "temp MiB/dev", "out MiB/dev",
       "all-gather (count / bytes)", "all-reduce (count / bytes)", "other collectives",
       "in a cond branch", "compile s"], rows)


def _plot(records, out):
  plt = _common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ns = [r["devices"] for r in records]
  for name in ("contrastive", "es", "clip_adam"):
    mem = [(r[name]["argument_bytes"] + r[name]["temp_bytes"]) / 2**20 for r in records]
    ax1.plot(ns, mem, "o-", label=name)
    moved = [max(1, sum(c["bytes"] for c in r[name]["collectives"].values())) for r in
             records]
    ax2.plot(ns, moved, "o-", label=name)
  ax1.set(xscale="log", yscale="log", xlabel="devices",
          ylabel="per-device memory, MiB (args + temp)", title="compiled memory")
  ax2.set(xscale="log", yscale="log", xlabel="devices",
          ylabel="collective bytes per device per step",
          title="all-gather + all-reduce (+ others)")
  for ax in (ax1, ax2):
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend()
  _common.save_figure(fig, out, NAME)


def spec_for(n, quick):
  if quick:
    return {"contrastive": dict(batch=4096, dim=64, width=128, chunk=128, block=512),
            "es": dict(num_params=2**14, hidden=128),
            "clip_adam": dict(leaves=4, side=2048)}
  return {"contrastive": dict(batch={8: 2**14, 64: 2**17, 256: 2**20}[n], dim=256, width=512,
                              chunk=256, block=1024),
          "es": dict(num_params=2**20, hidden=1024),
          "clip_adam": dict(leaves=16, side=8192)}


def main():
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    print(json.dumps(worker(json.loads(sys.argv[2]))))
    return
  args = _common.parse_args(__doc__.splitlines()[0])
  device_counts = (8,) if args.quick else (8, 64, 256)
  records = []
  for n in tqdm(device_counts, desc="device counts (compile only)"):
    records.append(_run_worker(n, spec_for(n, args.quick)))
  problems = [p for r in records for p in check(r)]
  load = os.getloadavg()
  markdown = (f"Compile-only (never run), per device; load average {load[0]:.1f} on "
              f"{os.cpu_count()} cores during the compiles.\n\n"
              + _table(records, lambda n: spec_for(n, args.quick))
              + "\n\nFormulas checked: " + ("all hold." if not problems else
                                            "; ".join(problems)))
  _common.write_results(args.out, NAME, payload={
      "quick": args.quick, "records": records, "load_average": load,
      "specs": {n: spec_for(n, args.quick) for n in device_counts},
      "formula_mismatches": problems}, markdown=markdown)
  _plot(records, args.out)
  if problems:
    raise SystemExit("formula mismatches:\n" + "\n".join(problems))


if __name__ == "__main__":
  main()
