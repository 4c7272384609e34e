"""Timing helpers shared by the benchmarks: interleaved medians on a noisy, shared machine."""

import time

import numpy as np


def interleaved(fns, repeats, warmup=1):
  """Median seconds per call of each fn, plus each fn's first-call seconds.

  Calls alternate between the fns (a, b, a, b, ...) so that background load on a shared machine
  hits every side alike instead of whichever happened to run second. The first `warmup` calls
  of each fn (jit compile, allocator warm-up) are not part of the median.
  """
  times = [[] for _ in fns]
  for _ in range(warmup + repeats):
    for k, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  return [float(np.median(t[warmup:])) for t in times], [t[0] for t in times]


def torch_at(n_threads, fn):
  """fn run with torch's intra-op pool at n_threads (set per call: the calls are interleaved).

  On a loaded 2-core machine torch's OpenMP pool can be several times slower with 2 threads
  than with 1, so the benchmarks time both and take the faster as the reference.
  """
  import torch

  def run():
    torch.set_num_threads(n_threads)
    return fn()
  return run
