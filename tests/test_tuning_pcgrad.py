"""PCGrad vs hand / numpy computations, and the PCGrad LoRA train step vs a numpy update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cast_jax.data.batching import collate_train
from cast_jax.train import OptimizerConfig, TrainState, tree_equal
from cast_jax.tuning import (LoraConfig, all_heads_mask, bucket_mask, init_lora, lora_frozen,
                             make_lora_loss_fn, make_lora_train_step, project_one_sided,
                             project_symmetric, run_lora)
from tuning_data import examples, tiny_llama

LCFG = LoraConfig(rank=4, alpha=8.0)


def _tree(v):
  """A 2-D vector split over a nested pytree: the projection must see one global vector."""
  return {"x": jnp.asarray(v[:1], jnp.float32), "y": {"z": jnp.asarray(v[1:], jnp.float32)}}


def _flat(t):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(t)])


def test_hand_computation():
  # g_a = (1, 0), g_u = (-1, 1): dot = -1, |g_u|^2 = 2, so g_a' = g_a + g_u / 2 = (0.5, 0.5);
  # symmetric: g_u' = g_u + g_a = (0, 1), update g_a' + g_u' = (0.5, 1.5).
  ga, gu = _tree([1.0, 0.0]), _tree([-1.0, 1.0])
  out, stats = project_one_sided(ga, gu)
  np.testing.assert_allclose(_flat(out), [0.5, 0.5], rtol=1e-7)
  assert float(stats["dot"]) == -1.0 and float(stats["conflict"]) == 1.0
  np.testing.assert_allclose(float(stats["cos"]), -1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(_flat(project_symmetric(ga, gu)[0]), [0.5, 1.5], rtol=1e-7)
  # No conflict: one-sided leaves g_a exactly as it was; symmetric is the plain sum.
  out, stats = project_one_sided(ga, _tree([1.0, 1.0]))
  assert tree_equal(out, ga) and float(stats["conflict"]) == 0.0
  np.testing.assert_allclose(_flat(project_symmetric(ga, _tree([1.0, 1.0]))[0]), [2.0, 1.0])
  assert tree_equal(project_one_sided(ga, _tree([0.0, 0.0]))[0], ga)  # zero reference


def _numpy_pcgrad(a, u, symmetric):
  dot = a @ u
  if dot >= 0:
    return a + u if symmetric else a
  pa = a - dot / (u @ u) * u
  return pa + (u - dot / (a @ a) * a) if symmetric else pa


@pytest.mark.parametrize("seed", range(6))
def test_random_pytrees_vs_numpy_global_convention(seed):
  rng = np.random.RandomState(seed)
  shapes = {"a": (3, 5, 2), "b": {"c": (7,), "d": (2, 2, 3)}}
  mk = lambda: jax.tree.map(lambda s: jnp.asarray(rng.randn(*s), jnp.float32), shapes,
                            is_leaf=lambda x: isinstance(x, tuple))
  ga, gu = mk(), mk()
  a, u = _flat(ga), _flat(gu)
  one, _ = project_one_sided(ga, gu)
  np.testing.assert_allclose(_flat(one), _numpy_pcgrad(a, u, False), rtol=1e-5, atol=1e-5)
  assert _flat(one) @ u >= -1e-5 * np.linalg.norm(a) * np.linalg.norm(u)
  sym, _ = project_symmetric(ga, gu)
  np.testing.assert_allclose(_flat(sym), _numpy_pcgrad(a, u, True), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(one) == jax.tree.structure(ga)


def test_global_not_per_leaf():
  # Leaf x conflicts (-2 < 0) but the global dot is +1: nothing is projected.
  ga, gu = _tree([1.0, 3.0]), _tree([-2.0, 1.0])
  assert tree_equal(project_one_sided(ga, gu)[0], ga)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  _, config, params = tiny_llama(tmp_path_factory.mktemp("llama") / "base")
  return config, params


@pytest.mark.parametrize("mode,heads", [("one_sided", "bucket"), ("one_sided", "all"),
                                        ("symmetric", "bucket")])
def test_train_step_update_is_the_projected_gradient(model, mode, heads):
  """SGD step of the PCGrad LoRA step == lr * numpy-projected (g_a, g_u), for full and
  head-restricted LoRA; the two batches share prompts with different answers (a conflict)."""
  config, params = model
  L, H = config.num_layers, config.num_heads
  mask = (bucket_mask(np.random.RandomState(0).rand(L, H), 4, 1) if heads == "bucket"
          else all_heads_mask((L, H)))
  frozen = lora_frozen(params, mask, config)
  lora = init_lora(config, jax.random.PRNGKey(0), LCFG)
  lora["b"] = 0.2 * jax.random.normal(jax.random.PRNGKey(1), lora["b"].shape)
  align = collate_train(examples(4, 0, response_ids=[5, 6, 7]), pad_id=0, multiple=16)
  util = collate_train(examples(4, 0, response_ids=[40, 41, 42]), pad_id=0, multiple=16)
  loss_fn = make_lora_loss_fn(config, LCFG)
  grad = jax.jit(jax.grad(lambda t, b: loss_fn(t, frozen, b, None, {})[0]))
  ga, gu = grad(lora, align), grad(lora, util)
  a, u = _flat(ga), _flat(gu)
  assert a @ u < 0, "the test data must make the two gradients conflict"
  want = _numpy_pcgrad(a, u, mode == "symmetric")

  lr = 0.1
  tx = optax.sgd(lr)
  step = make_lora_train_step(config, tx, LCFG, pcgrad=mode, donate=False)
  state = TrainState.create(lora, tx, jax.random.PRNGKey(0))
  new, metrics = step(state, frozen, {"align": align, "util": util})
  got = (_flat(lora) - _flat(new.trainable)) / lr
  np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
  np.testing.assert_allclose(float(metrics["pcgrad/dot"]), a @ u, rtol=1e-4)
  assert float(metrics["pcgrad/conflict"]) == 1.0
  np.testing.assert_allclose(float(metrics["loss"]), float(loss_fn(lora, frozen, align, None,
                                                                   {})[0]), rtol=1e-6)
  if mode == "one_sided":
    assert want @ u >= -1e-6 * np.linalg.norm(a) * np.linalg.norm(u)
  b_new = np.asarray(new.trainable["b"]).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(b_new[mask == 0],
                                np.asarray(lora["b"]).transpose(0, 2, 1, 3)[mask == 0])


def test_run_lora_pcgrad_resumes_exactly(model, tmp_path):
  """run_lora with PCGrad through the substrate loop: 4 steps straight == 2 + resume to 4."""
  config, params = model
  mask = bucket_mask(np.random.RandomState(3).rand(config.num_layers, config.num_heads), 4, 4)
  opt = OptimizerConfig(learning_rate=1e-3, schedule="constant")
  kw = dict(pad_id=0, batch_size=4, seed=42, optimizer=opt, lora_config=LCFG,
            util_examples=examples(12, 7), pcgrad="one_sided", progress=False, log_every=1)
  straight, _ = run_lora(params, config, examples(12, 0), mask, num_steps=4, **kw)
  run_lora(params, config, examples(12, 0), mask, num_steps=2, workdir=tmp_path / "w", **kw)
  resumed, summary = run_lora(params, config, examples(12, 0), mask, num_steps=4,
                              workdir=tmp_path / "w", extend=True, **kw)
  assert summary["start_step"] == 2 and summary["final_step"] == 4
  assert tree_equal(straight, resumed)
  with pytest.raises(ValueError, match="util_examples together with pcgrad"):
    run_lora(params, config, examples(12, 0), mask, num_steps=1, **{**kw, "pcgrad": None})
