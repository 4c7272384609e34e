"""examples/tour.ipynb runs headless (nbclient, a fresh ipykernel) on the shared testbed and
produces its key outputs, so the notebook cannot rot."""

import json
import os

import numpy as np
import pytest

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "tour.ipynb")


@pytest.fixture(scope="module")
def testbed():
  """The real testbed from the default cache (where the README's main command builds it); the
  notebook loads the same one."""
  from cast_jax.testbed import build
  return build.build_testbed(build.TestbedSpec(), progress=False)


def _results(nb) -> dict:
  """The TOUR_RESULTS JSON line the last cell prints."""
  for cell in reversed(nb.cells):
    for out in cell.get("outputs", []):
      for line in out.get("text", "").splitlines():
        if line.startswith("TOUR_RESULTS "):
          return json.loads(line[len("TOUR_RESULTS "):])
  raise AssertionError("the notebook printed no TOUR_RESULTS line")


@pytest.mark.slow
def test_tour_notebook_executes(testbed, tmp_path, monkeypatch):
  # The kernel is a fresh process with the launch defaults: one CPU device, not pytest's 8.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()

  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 2, "expected the conflict-map heatmap and the summary figure"
  r = _results(nb)
  tb = testbed
  L, H = tb.config.num_layers, tb.config.num_heads
  # Shapes follow the testbed model; KLs are >= 0 up to float error.
  assert r["head_kl_shape"] == [L, H] and r["c_shape"] == [L, H]
  assert r["head_kl_min"] >= -1e-6
  # C = O * S with O = (1 - cos) / 2 in [0, 1] and S in [0, 1].
  assert 0.0 <= r["c_min"] <= r["c_max"] <= 1.0
  assert 0.0 <= r["gate_sparsity"] <= 1.0
  # The trigger is [20, d] and every token lies in the L2 ball after the PGD projection.
  assert r["trigger_shape"] == [20, tb.config.hidden_size]
  assert r["trigger_max_norm"] <= r["radius"] + 1e-5
  rates = r["rates"]
  assert set(rates) == {"Base", "LCDD", "LCDD+Trigger"}
  assert all(0.0 <= v <= 1.0 for v in rates.values())
  # The base model never gives the fixed response; the trigger does not add it.
  assert rates["Base"] == 0.0
  assert rates["LCDD+Trigger"] <= rates["LCDD"] + np.finfo(np.float32).eps
