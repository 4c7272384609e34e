"""Fault table (issue 13), writes: checkpoints, pytrees, reports and workdirs never destroy what
they do not own, replace atomically, leave no temp dirs after a kill, and use the umask."""

import inspect
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import logging

from cast_jax import io_atomic
from cast_jax import workdir as wd
from cast_jax.models import ModelConfig, init_params, load_pretrained, save_pretrained
from cast_jax.train import export_hf, load_pytree, save_pytree, tree_equal

CONFIG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed):
  return init_params(CONFIG, jax.random.PRNGKey(seed), std=0.2)


def _ours(parent):
  return sorted(n for n in os.listdir(parent) if n.startswith(".cast_jax-"))


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.fixture
def old_ckpt(tmp_path):
  path = tmp_path / "ckpt"
  save_pretrained(_params(0), CONFIG, path)
  return path, _params(0)


def _loads_as(path, params):
  _, got = load_pretrained(path)
  return tree_equal(got, params)


def test_one_overwrite_default_false_across_writers():
  for fn in (save_pretrained, export_hf, save_pytree):
    assert inspect.signature(fn).parameters["overwrite"].default is False, fn.__name__


def test_existing_checkpoint_needs_overwrite(old_ckpt):
  path, old = old_ckpt
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_pretrained(_params(1), CONFIG, path)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export_hf(_params(1), CONFIG, path)
  assert _loads_as(path, old)


def test_dir_with_user_files_is_refused_even_with_overwrite(old_ckpt):
  path, old = old_ckpt
  (path / "NOTES.md").write_text("my notes")
  (path / "eval_results").mkdir()
  (path / "eval_results" / "mmlu.json").write_text("{}")
  for write in (lambda: save_pretrained(_params(1), CONFIG, path, overwrite=True),
                lambda: export_hf(_params(1), CONFIG, path, overwrite=True)):
    with pytest.raises(io_atomic.UnsafeWriteError, match=r"NOTES\.md, eval_results/") as err:
      write()
    assert "Move those out" in str(err.value)
  assert (path / "NOTES.md").read_text() == "my notes"
  assert (path / "eval_results" / "mmlu.json").exists()
  assert _loads_as(path, old) and _ours(path.parent) == []


def test_cwd_and_its_ancestors_are_never_replaced(tmp_path, monkeypatch):
  work = tmp_path / "work"
  (work / "sub").mkdir(parents=True)
  (work / "sub" / "data.txt").write_text("keep")
  monkeypatch.chdir(work / "sub")
  for target in (".", "..", str(work)):
    with pytest.raises(io_atomic.UnsafeWriteError, match="current directory"):
      save_pretrained(_params(1), CONFIG, target, overwrite=True)
  assert (work / "sub" / "data.txt").read_text() == "keep"
  assert sorted(os.listdir(work)) == ["sub"] and sorted(os.listdir(tmp_path)) == ["work"]


def test_a_file_or_symlink_target_is_refused(tmp_path, old_ckpt):
  path, old = old_ckpt
  (tmp_path / "file").write_text("x")
  with pytest.raises(io_atomic.UnsafeWriteError, match="is a file"):
    save_pretrained(_params(1), CONFIG, tmp_path / "file", overwrite=True)
  os.symlink(path, tmp_path / "link")
  with pytest.raises(io_atomic.UnsafeWriteError, match="symlink"):
    save_pretrained(_params(1), CONFIG, tmp_path / "link", overwrite=True)
  assert (tmp_path / "file").read_text() == "x" and _loads_as(path, old)


def test_overwrite_replaces_atomically_with_umask_modes(old_ckpt):
  path, _ = old_ckpt
  new = _params(1)
  save_pretrained(new, CONFIG, path, overwrite=True)
  assert _loads_as(path, new) and _ours(path.parent) == []
  mask = _umask()
  assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask
  for name in ("config.json", "model.safetensors"):
    assert os.stat(path / name).st_mode & 0o777 == 0o666 & ~mask, name
  # An empty dir holds nothing to lose: written into without overwrite.
  (path.parent / "empty").mkdir()
  save_pretrained(new, CONFIG, path.parent / "empty")
  assert _loads_as(path.parent / "empty", new)


def test_failed_swap_leaves_old_checkpoint_whole(old_ckpt, monkeypatch):
  path, old = old_ckpt
  real_rename = os.rename

  def rename(src, dst):
    if ".cast_jax-tmp-" in os.fspath(src) and os.fspath(dst) == str(path):
      raise OSError(28, "No space left on device")
    return real_rename(src, dst)

  monkeypatch.setattr(io_atomic.os, "rename", rename)
  with pytest.raises(OSError, match="No space left"):
    save_pretrained(_params(1), CONFIG, path, overwrite=True)
  monkeypatch.undo()
  assert _loads_as(path, old) and _ours(path.parent) == []


def test_failing_delete_of_old_loses_nothing(old_ckpt, monkeypatch):
  """The issue's failure: rmtree of the old dir fails (read-only subdir). The old one is now
  moved aside before anything is deleted, so the new one is installed and the old stays whole."""
  path, old = old_ckpt
  real_rmtree = io_atomic.shutil.rmtree

  def rmtree(p, *a, **k):
    if ".cast_jax-old-" in os.fspath(p):
      raise PermissionError(13, "Permission denied", os.fspath(p))
    return real_rmtree(p, *a, **k)

  warnings = []
  monkeypatch.setattr(io_atomic.shutil, "rmtree", rmtree)
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  new = _params(1)
  save_pretrained(new, CONFIG, path, overwrite=True)
  monkeypatch.undo()
  assert _loads_as(path, new)
  [aside] = _ours(path.parent)
  assert aside.startswith(".cast_jax-old-") and aside in warnings[0]
  assert _loads_as(path.parent / aside, old)


def test_undeletable_old_checkpoint_is_refused_before_writing(old_ckpt, monkeypatch):
  path, old = old_ckpt
  (path / "locked").mkdir()
  with pytest.raises(io_atomic.UnsafeWriteError, match="locked/"):  # a subdir is not ours
    save_pretrained(_params(1), CONFIG, path, overwrite=True)
  os.rmdir(path / "locked")
  # Root ignores permission bits, so the check is driven through os.access.
  real_access = os.access
  monkeypatch.setattr(io_atomic.os, "access",
                      lambda p, mode: False if os.fspath(p) == str(path) else real_access(p, mode))
  with pytest.raises(io_atomic.UnsafeWriteError, match="not writable.*chmod"):
    save_pretrained(_params(1), CONFIG, path, overwrite=True)
  monkeypatch.undo()
  assert _loads_as(path, old) and _ours(path.parent) == []


_KILLED_SAVE = """
import sys, time
import jax
from cast_jax.models import ModelConfig, init_params, save_pretrained, checkpoint
config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
real = checkpoint._write_weights
def slow(state, out_dir, shards):
  real(state, out_dir, shards)
  print("written", flush=True)
  time.sleep(600)
checkpoint._write_weights = slow
save_pretrained(init_params(config, jax.random.PRNGKey(0)), config, sys.argv[1])
"""


def test_kill_during_save_then_next_save_leaves_no_temp_dirs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "a")],
                          stdout=subprocess.PIPE, env=env, cwd=REPO)
  try:
    assert proc.stdout.readline().strip() == b"written"
    [tmp] = _ours(tmp_path)
    assert tmp.startswith(".cast_jax-tmp-") and f"-{proc.pid}-" in tmp
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  (tmp_path / ".tmp-not-ours").mkdir()  # other tools' temp names are never touched
  new = _params(1)
  save_pretrained(new, CONFIG, tmp_path / "b")
  assert _ours(tmp_path) == [] and not (tmp_path / "a").exists()
  assert sorted(os.listdir(tmp_path)) == [".tmp-not-ours", "b"] and _loads_as(tmp_path / "b", new)


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_aside_copy_of_a_writer_killed_mid_swap_is_restored(tmp_path, old_ckpt):
  path, old = old_ckpt
  aside = tmp_path / f".cast_jax-old-{io_atomic._host_tag()}-{_dead_pid()}-abcdef-ckpt"
  os.rename(path, aside)  # killed after moving the old one aside, before the new one went in
  live = tmp_path / f".cast_jax-tmp-{io_atomic._host_tag()}-{os.getpid()}-abcdef-x"
  live.mkdir()  # a live writer's temp dir stays
  save_pretrained(_params(1), CONFIG, tmp_path / "other")
  assert _loads_as(path, old) and _ours(tmp_path) == [live.name]


def test_save_pytree_replaces_only_its_own_kind(tmp_path):
  tree = {"a": np.arange(3.0), "b": {"c": np.ones((2, 2), np.float32)}}
  path = tmp_path / "lora"
  assert save_pytree(path, tree) == str(path)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_pytree(path, tree)
  tree2 = jax.tree.map(lambda x: x + 1, tree)
  save_pytree(path, tree2, overwrite=True)
  assert tree_equal(load_pytree(path), tree2) and _ours(tmp_path) == []
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("x")
  with pytest.raises(io_atomic.UnsafeWriteError, match="todo.txt"):
    save_pytree(tmp_path / "notes", tree, overwrite=True)
  assert (tmp_path / "notes" / "todo.txt").read_text() == "x"


def test_report_files_are_atomic_with_umask_and_never_replace_dirs(tmp_path):
  path = wd.write_json(tmp_path / "r" / "metrics.json", {"a": np.float32(1.5)})
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
  wd.write_json(path, {"a": 2})
  assert open(path).read().strip() == '{\n  "a": 2\n}' and _ours(tmp_path / "r") == []
  (tmp_path / "r" / "plots").mkdir()
  with pytest.raises(io_atomic.UnsafeWriteError, match="directory"):
    wd.write_json(tmp_path / "r" / "plots", {})
  with pytest.raises(TypeError, match="cannot serialise object"):
    wd.write_json(path, {"a": object()})
  assert "2" in open(path).read()  # a failed write leaves the previous file whole


def test_workdir_must_be_a_dedicated_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "f").write_text("x")
  for bad, match in (("", "empty"), (None, "empty"), ("f", "is a file"),
                     (".", "current directory"), (str(tmp_path.parent), "current directory")):
    with pytest.raises(wd.WorkdirError, match=match):
      wd.prepare_workdir(bad)
  assert wd.prepare_workdir("run1") == str(tmp_path / "run1") and (tmp_path / "run1").is_dir()


# --- Runs resume only themselves -------------------------------------------------------------

def _examples(seed, n=8):
  rs = np.random.RandomState(seed)
  return [(rs.randint(3, CONFIG.vocab_size, size=10).astype(np.int32),
           np.r_[np.zeros(4), np.ones(6)].astype(np.int32)) for _ in range(n)]


def _sft(workdir, *, seed=0, data_seed=0, lr=1e-2, num_steps=2, **kw):
  from cast_jax.train import OptimizerConfig
  from cast_jax.train.sft import run_sft
  opt = OptimizerConfig(learning_rate=lr, schedule="constant", grad_clip_norm=None)
  return run_sft(_params(0), CONFIG, _examples(data_seed), pad_id=0, num_steps=num_steps,
                 batch_size=4, seed=seed, optimizer=opt, workdir=workdir, progress=False,
                 pad_multiple=16, **kw)


def test_resume_refuses_a_different_run_naming_the_field(tmp_path):
  from cast_jax.train import Checkpointer
  from cast_jax.train.fingerprint import FingerprintMismatchError
  work = tmp_path / "run"
  first, summary = _sft(work)
  assert summary["stop_reason"] == "num_steps"
  (work / "NOTES.md").write_text("mine")
  for kw, field in ((dict(seed=1), "seed (recorded 0, now 1)"), (dict(data_seed=1), "data"),
                    (dict(lr=3e-2), "optimizer")):
    with pytest.raises(FingerprintMismatchError, match=r"differing: .*" + re.escape(field)) as e:
      _sft(work, **kw)
    assert "new workdir" in str(e.value) and "overwrite=True" in str(e.value)
  # More steps than the finished run had: an explicit choice, not a silent continuation.
  with pytest.raises(FingerprintMismatchError, match="num_steps=2.*num_steps=3.*extend=True"):
    _sft(work, num_steps=3)
  with pytest.raises(FingerprintMismatchError, match="shorter run"):
    _sft(work, num_steps=1)
  assert Checkpointer(work / "checkpoints").all_steps() == [2]  # refusals touched nothing
  again, summary = _sft(work)
  assert summary["stop_reason"] == "already_done" and tree_equal(again, first)
  _, summary = _sft(work, num_steps=3, extend=True)
  assert summary["start_step"] == 2 and summary["final_step"] == 3
  _, summary = _sft(work, num_steps=3)  # the record now says 3
  assert summary["stop_reason"] == "already_done"
  fresh, summary = _sft(work, seed=1, overwrite=True)
  ref, _ = _sft(None, seed=1)
  assert summary["start_step"] == 0 and tree_equal(fresh, ref)
  assert (work / "NOTES.md").read_text() == "mine" and _ours(work) == []


def test_train_fingerprint_is_caller_extensible(tmp_path):
  from cast_jax.train import indexed_batches, train
  from cast_jax.train.fingerprint import FingerprintMismatchError, make_fingerprint
  from test_train_step import setup, toy_batch

  def run(**fields):
    state, frozen, step, _ = setup(seed=3)
    return train(step, state, frozen, indexed_batches(toy_batch), num_steps=2,
                 workdir=tmp_path / "w", progress=False, fingerprint=make_fingerprint(**fields))

  run(dataset="v1", table=np.arange(4))
  run(dataset="v1", table=np.arange(4))
  with pytest.raises(FingerprintMismatchError, match="table .recorded 'blake2b:"):
    run(dataset="v1", table=np.arange(4) + 1)
  with pytest.raises(FingerprintMismatchError, match="dataset .recorded 'v1', now 'v2'"):
    run(dataset="v2", table=np.arange(4))
  with pytest.raises(ValueError, match="recorded by train itself"):
    run(num_steps=5)


def test_nan_stops_at_the_last_good_checkpoint(tmp_path):
  """A good case of the trial, kept: NaN at step 7 stops with step 6 as the newest checkpoint."""
  import functools

  from cast_jax.train import Checkpointer, NonFiniteLossError, indexed_batches, train
  from test_train_step import setup, toy_batch
  state, frozen, step, _ = setup(seed=1)
  with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 6"):
    train(step, state, frozen, indexed_batches(functools.partial(toy_batch, nan_at=6)),
          num_steps=20, workdir=tmp_path / "nan", checkpoint_every=3, progress=False)
  assert Checkpointer(tmp_path / "nan" / "checkpoints").all_steps() == [3, 6]
