"""CLIP-style contrastive training on several JAX processes with gradtx.

The same script runs on one machine and on a cluster:

    # here: spawns 2 local processes × 2 CPU devices, joined by jax.distributed
    python examples/multihost_clip.py --num-processes 2

    # a cluster: one copy per host, started by your launcher; jax.distributed.initialize()
    # reads the coordinator, process count and id from TPU metadata, SLURM, Open MPI or
    # Kubernetes, or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
    python examples/multihost_clip.py --steps 1000 --batch-size 32768 --out result.json

What it shows:

- the global batch is sharded over every device of every process (mesh axis ``data``);
  each process builds only its own rows (``jax.make_array_from_process_local_data``),
  as a real input pipeline does;
- ``gradtx.sharded_cached_value_and_grad``: every device encodes its rows chunk by
  chunk, the representations (not the activations) are all-gathered so the negatives
  are the global batch, and the gradient is the exact gradient of the whole-batch loss;
- ``gradtx.clip_by_global_norm``: the norm is the norm of the *global* gradient on every
  process (it is a reduction inside the compiled step, not a per-process statistic);
- layer-wise rules: ``gradtx.layerwise_lr_decay`` (lower learning rates for the layers
  near the inputs) and ``gradtx.scale_by_path`` (a smaller one for the temperature);
- per-process progress lines and one result file, written by process 0.

``--check`` also computes the first step's loss and gradient norm on this process's
first device alone from the gathered global batch, and records whether they match.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num-processes", type=int, default=None,
                  help="spawn this many local processes (CPU); omit on a cluster")
  ap.add_argument("--devices-per-process", type=int, default=2,
                  help="virtual CPU devices per spawned process")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch-size", type=int, default=256, help="the global batch (pairs)")
  ap.add_argument("--chunk-size", type=int, default=8, help="rows encoded at once per device")
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--learning-rate", type=float, default=3e-3)
  ap.add_argument("--max-norm", type=float, default=1.0)
  ap.add_argument("--check", action="store_true",
                  help="compare step 1 with a single-device computation of the global batch")
  ap.add_argument("--out", default="multihost_clip_result.json")
  ap.add_argument("--timeout", type=float, default=1800.0, help="local spawn: seconds")
  return ap.parse_args(argv)


# --- local launcher: N copies of this script, joined by jax.distributed ----------------

def spawn(args) -> int:
  """Starts ``--num-processes`` copies of this script; returns the first failure's code."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  argv = sys.argv[1:]
  procs = []
  for i in range(args.num_processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(args.num_processes), JAX_PROCESS_ID=str(i),
               JAX_PLATFORMS="cpu")
    flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env,
                                  start_new_session=True))
  deadline = time.monotonic() + args.timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):  # one failed: the rest would hang
      deadline = min(deadline, time.monotonic() + 10.0)
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  codes = [p.returncode for p in procs]
  return next((c for c in codes if c != 0), 0)


def initialize_distributed():
  """Joins the other processes: from the environment, or auto-detected on a cluster."""
  import jax

  if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  num = os.environ.get("JAX_NUM_PROCESSES")
  pid = os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(  # None: auto-detected (TPU, SLURM, Open MPI, Kubernetes)
      coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
      num_processes=None if num is None else int(num),
      process_id=None if pid is None else int(pid))
  return jax


# --- the model and the data ---------------------------------------------------------------

def make_model(width):
  import flax.linen as nn
  import jax.numpy as jnp

  class Tower(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(self.width, name="layers_0")(x))
      x = nn.gelu(nn.Dense(self.width, name="layers_1")(x))
      return nn.Dense(self.width // 2, name="layers_2")(x)

  class CLIP(nn.Module):
    width: int

    def setup(self):
      self.image = Tower(self.width)
      self.text = Tower(self.width)
      self.log_temperature = self.param("log_temperature", nn.initializers.constant(
          jnp.log(0.1)), ())

    def __call__(self, batch):
      return {"image": self.image(batch["image"]), "text": self.text(batch["text"])}

  return CLIP(width)


IMAGE_DIM, TEXT_DIM, LATENT_DIM = 48, 32, 16


def local_batch(step, rows, first_row, seed=0):
  """This process's ``rows`` pairs of the global batch of ``step``, from ``first_row``.

  Pairs share a latent ``z``: ``image = tanh(z A) + noise``, ``text = z B + noise``. Row
  ``r`` of a step is drawn from ``(seed, step, r)`` alone, so the global batch is the same
  whatever the number of processes.
  """
  import numpy as np

  mix = np.random.default_rng(seed)
  a = mix.standard_normal((LATENT_DIM, IMAGE_DIM)) / 4
  b = mix.standard_normal((LATENT_DIM, TEXT_DIM)) / 4
  out = {"image": [], "text": []}
  for r in range(first_row, first_row + rows):
    g = np.random.default_rng((seed, step, r))
    z = g.standard_normal(LATENT_DIM)
    out["image"].append(np.tanh(z @ a) + 0.1 * g.standard_normal(IMAGE_DIM))
    out["text"].append(z @ b + 0.1 * g.standard_normal(TEXT_DIM))
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


# --- training -----------------------------------------------------------------------------

def make_optimizer(args):
  import optax

  import gradtx

  return optax.chain(
      gradtx.clip_by_global_norm(args.max_norm),  # the norm of the global gradient
      optax.adamw(args.learning_rate, weight_decay=1e-4),
      # lr × 0.7^(2 - depth): the layers near the inputs move least
      gradtx.layerwise_lr_decay(0.7, num_layers=1, depth_rules={
          r"params/(?:image|text)/layers_(\d+)/.*": 0,  # depth = the layer's index
          r"params/log_temperature": 2}),
      gradtx.scale_by_path({r"params/log_temperature": 0.1}, default=1.0),
  )


def train(args):
  jax = initialize_distributed()
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gradtx

  me, nproc = jax.process_index(), jax.process_count()
  ndev = jax.device_count()

  def log(msg):
    print(f"[process {me}/{nproc}] {msg}", flush=True)

  if args.batch_size % ndev:
    raise SystemExit(f"--batch-size={args.batch_size} must be divisible by the {ndev} "
                     f"devices of the {nproc} processes (mesh axis 'data'); use a multiple "
                     f"of {ndev}")
  mesh = jax.make_mesh((ndev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  model, tx = make_model(args.width), make_optimizer(args)

  def encode(params, chunk, rng):
    del rng
    return model.apply(params, chunk)

  def loss_fn(params, reps):
    temperature = jnp.exp(params["params"]["log_temperature"])
    return gradtx.info_nce(reps["image"], reps["text"], temperature=temperature)

  grad_fn = gradtx.sharded_cached_value_and_grad(encode, loss_fn, mesh=mesh,
                                                 chunk_size=args.chunk_size)

  # Everything but the batch replicated, in and out: step t + 1 reuses step t's program.
  @functools.partial(jax.jit, out_shardings=replicated)
  def step(params, opt_state, batch):
    loss, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  dummy = local_batch(0, 1, 0)
  params = jax.jit(model.init, out_shardings=replicated)(jax.random.key(0), dummy)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  per_process = args.batch_size // nproc  # rows this process builds (its devices' rows)

  def global_batch(t):
    local = local_batch(t, per_process, me * per_process)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows, x), local)

  result = {"num_processes": nproc, "num_devices": ndev, "batch_size": args.batch_size,
            "loss": [], "grad_norm": [], "clip_scale": []}
  start = time.perf_counter()
  for t in range(1, args.steps + 1):
    batch = global_batch(t)
    if t == 1 and args.check:
      result.update(check_first_step(params, batch, loss_fn, encode, log))
    params, opt_state, loss = step(params, opt_state, batch)
    clip_state = opt_state[0]  # global values: identical on every process
    grad_norm, scale = float(clip_state.grad_norm), float(clip_state.clip_scale)
    result["loss"].append(float(loss))
    result["grad_norm"].append(grad_norm)
    result["clip_scale"].append(scale)
    if t == 1 and args.check:
      result["grad_norm_matches_single_device"] = bool(
          np.isclose(grad_norm, result["single_device_grad_norm"], rtol=1e-5)
          and np.isclose(float(loss), result["single_device_loss"], rtol=1e-5))
    log(f"step {t} loss {float(loss):.4f} grad_norm {grad_norm:.4f} clip_scale {scale:.3f} "
        f"({time.perf_counter() - start:.1f} s)")
  result["seconds"] = time.perf_counter() - start
  result["temperature"] = float(jnp.exp(params["params"]["log_temperature"]))
  multihost_utils.sync_global_devices("done")
  if me == 0:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    log(f"wrote {args.out}")


def check_first_step(params, batch, loss_fn, encode, log):
  """Step 1's loss and global gradient norm on this process's first device alone, the
  whole batch gathered from every process (for ``--check``)."""
  import jax
  from jax.experimental import multihost_utils

  import gradtx

  local = jax.local_devices()[0]
  full = jax.device_put(multihost_utils.process_allgather(batch, tiled=True), local)
  p1 = jax.device_put(multihost_utils.process_allgather(params, tiled=True), local)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, encode(p, full, None))))(p1)
  norm = float(gradtx.global_norm(grads))
  log(f"single-device check: loss {float(loss):.4f} grad_norm {norm:.4f}")
  return {"single_device_loss": float(loss), "single_device_grad_norm": norm}


def main(argv=None):
  args = parse_args(argv)
  if args.num_processes and "JAX_PROCESS_ID" not in os.environ:
    sys.exit(spawn(args))
  train(args)


if __name__ == "__main__":
  main()
