"""gradtx._random's counter hash against Wellons' mixers written out in numpy.

The C originals (github.com/skeeto/hash-prospector): lowbias32 is
``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16`` and
triple32 ``x ^= x >> 17; x *= 0xed5ad4bb; x ^= x >> 11; x *= 0xac4c1b51;
x ^= x >> 15; x *= 0x31848bab; x ^= x >> 14``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradtx import _random


def _lowbias32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _triple32(x):
  x = x ^ (x >> np.uint32(17))
  x = x * np.uint32(0xED5AD4BB)
  x = x ^ (x >> np.uint32(11))
  x = x * np.uint32(0xAC4C1B51)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x31848BAB)
  return x ^ (x >> np.uint32(14))


@pytest.mark.parametrize("mixer, reference", [("lowbias32", _lowbias32),
                                              ("triple32", _triple32)])
def test_counter_hash_matches_numpy(mixer, reference):
  k = np.arange(5000, dtype=np.uint32) * np.uint32(7919)   # wraps around 2^32
  s0, s1 = np.uint32(0x9E3779B9), np.uint32(0x12345678)
  with np.errstate(over="ignore"):
    expected = reference(reference(k * (s1 | np.uint32(1)) + s0) ^ s1)
  got = jax.jit(_random.counter_hash, static_argnums=3)(jnp.asarray(k), s0, s1, mixer)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # a bijection: distinct counters give distinct words
  assert len(np.unique(np.asarray(got))) == len(k)
