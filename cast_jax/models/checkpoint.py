"""HF checkpoint dirs <-> param pytrees.

Loading streams one stacked parameter at a time (all layers of `wq`, then all of `wk`, ...) out
of memory-mapped safetensors files and places it on its device/sharding before reading the next,
so host memory never holds the model twice. Pickle checkpoints are refused unless the caller
opts in explicitly. Saving goes through `cast_jax.io_atomic`: the dir appears whole, and only a
dir holding nothing but a checkpoint is ever replaced.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import safe_open
from safetensors.numpy import save_file

from cast_jax import io_atomic
from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import Params, param_shapes

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Every file name an HF causal-LM checkpoint dir (weights, config, tokenizer) may hold; a dir
# with anything else in it is not replaced by save_pretrained.
_HF_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
    r"model-\d+-of-\d+\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?|"
    r"tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|"
    r"vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json))$")
_HF_DIRS = ("additional_chat_templates",)  # tokenizer.save_pretrained's only subdir
_REDOWNLOAD = "Re-download the checkpoint (or re-export it) and load again."


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message names the tensor and the fix."""


def _hf_layout(config: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """Our key -> (HF name, hf->ours transform, ours->hf transform) for one layer or top level."""
  c = config
  D, H, K, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

  def proj(n):  # HF [n*Dh, D] <-> ours [D, n, Dh]
    return (lambda w: w.T.reshape(D, n, Dh), lambda w: w.reshape(D, n * Dh).T)

  def bias(n):
    return (lambda b: b.reshape(n, Dh), lambda b: b.reshape(n * Dh))

  ident = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)
  table = {
      "attn_norm": ("input_layernorm.weight", *ident),
      "wq": ("self_attn.q_proj.weight", *proj(H)),
      "wk": ("self_attn.k_proj.weight", *proj(K)),
      "wv": ("self_attn.v_proj.weight", *proj(K)),
      "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D),
             lambda w: w.reshape(H * Dh, D).T),
      "bq": ("self_attn.q_proj.bias", *bias(H)),
      "bk": ("self_attn.k_proj.bias", *bias(K)),
      "bv": ("self_attn.v_proj.bias", *bias(K)),
      "q_norm": ("self_attn.q_norm.weight", *ident),
      "k_norm": ("self_attn.k_norm.weight", *ident),
      "mlp_norm": ("post_attention_layernorm.weight", *ident),
      "w_gate": ("mlp.gate_proj.weight", *transpose),
      "w_up": ("mlp.up_proj.weight", *transpose),
      "w_down": ("mlp.down_proj.weight", *transpose),
      "embed": ("model.embed_tokens.weight", *ident),
      "final_norm": ("model.norm.weight", *ident),
      "lm_head": ("lm_head.weight", *transpose),
  }
  return table


def _resolve_dir(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
    raise FileNotFoundError(f"checkpoint dir {path!r} not found (and it is not a hub id 'org/name').")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
  except Exception as e:  # offline, missing repo, auth: say which and how to fix
    raise FileNotFoundError(
        f"could not fetch {path!r} from the hub ({type(e).__name__}: {e}). Download it elsewhere "
        f"and pass the local dir instead.") from e


def _weight_files(path: str, allow_pickle: bool) -> tuple[list[str], str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{index} is not a valid shard index (a JSON object with a "
                            f"'weight_map'): {type(e).__name__}: {e}. {_REDOWNLOAD}") from e
    missing = [n for n in files if not os.path.isfile(os.path.join(path, n))]
    if missing:
      raise CheckpointError(f"{index} lists shard(s) {missing[:4]} that are not in {path}. "
                            f"{_REDOWNLOAD}")
    return [os.path.join(path, n) for n in files], "safetensors"
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single], "safetensors"
  pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth"))]
  if pickles and not allow_pickle:
    raise CheckpointError(
        f"{path} holds only pickle weights {pickles}; unpickling can run arbitrary code. Convert "
        f"them to safetensors, or pass allow_pickle=True if you trust the source.")
  if pickles:
    return [os.path.join(path, n) for n in pickles], "pickle"
  raise CheckpointError(f"no model.safetensors(.index.json) or weights found in {path}.")


class _TensorSource:
  """name -> lazily read numpy tensor, over all weight files of a checkpoint."""

  def __init__(self, files: list[str], kind: str, stack: ExitStack):
    self._get: dict[str, Callable[[], np.ndarray]] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
      if kind == "safetensors":
        try:
          handle = stack.enter_context(safe_open(file, framework="numpy"))
          names = list(handle.keys())
          for name in names:
            self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as e:  # SafetensorError: truncated / corrupt header
          raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is "
                                f"truncated or corrupt. {_REDOWNLOAD}") from e
        for name in names:
          self._get[name] = (lambda h, n, f: lambda: _read_tensor(h, n, f))(handle, name, file)
      else:
        import torch  # only on the explicit allow_pickle path
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name, t in state.items():
          self.shapes[name] = tuple(t.shape)
          self._get[name] = (lambda t: lambda: t.float().numpy())(t)

  def read(self, name: str) -> np.ndarray:
    return self._get[name]()


def _read_tensor(handle, name: str, file: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except Exception as e:  # SafetensorError: data cut short after a valid header
    raise CheckpointError(f"{file}: tensor {name} cannot be read ({e}); the file is truncated "
                          f"or corrupt. {_REDOWNLOAD}") from e


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, shardings: Any = None,
                    allow_pickle: bool = False) -> tuple[ModelConfig, Params]:
  """Loads an HF Llama/Mistral/Qwen2/Qwen3 checkpoint (local dir or hub id).

  Args:
    path: dir with config.json and model.safetensors or model.safetensors.index.json + shards.
    dtype: dtype of the returned params.
    shardings: optional pytree of `jax.sharding.Sharding` matching the params (see
      `cast_jax.models.sharding.param_shardings`); each param is built straight on it.
    allow_pickle: permit `.bin` pickle weights (only for sources you trust).

  Returns:
    (config, params) with the layout of docs/design.md.
  """
  path = _resolve_dir(path)
  config = ModelConfig.from_pretrained(path)
  files, kind = _weight_files(path, allow_pickle)
  table = _hf_layout(config)
  shapes = param_shapes(config)
  np_dtype = np.dtype(jnp.dtype(dtype))
  flat_shardings = {}
  if shardings is not None:
    flat_shardings = {jax.tree_util.keystr(p): s for p, s in
                      jax.tree_util.tree_flatten_with_path(shardings)[0]}

  with ExitStack() as stack:
    source = _TensorSource(files, kind, stack)
    errors: list[str] = []
    expected_names: set[str] = set()

    def fetch(key: str, hf_name: str, ours_shape: tuple[int, ...]):
      expected_names.add(hf_name)
      if hf_name not in source.shapes:
        errors.append(f"missing tensor {hf_name} (for {key}{list(ours_shape)})")
        return None
      expected = _hf_shape(key, ours_shape)
      if source.shapes[hf_name] != expected:
        errors.append(f"tensor {hf_name} has shape {list(source.shapes[hf_name])}, expected "
                      f"{list(expected)} from config.json")
        return None
      # A view where possible: the dtype conversion happens while copying into the buffer.
      return table[key][1](source.read(hf_name))

    def place(keypath: str, value: np.ndarray):
      # device_put copies once; jnp.asarray would stage an extra host copy.
      sharding = flat_shardings.get(keypath)
      if sharding is None:
        return jax.device_put(value)
      return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    params: Params = {"layers": {}}
    for key, shape in shapes["layers"].items():
      buf = np.empty(shape, np_dtype)
      ok = True
      for i in range(config.num_layers):
        t = fetch(key, f"model.layers.{i}.{table[key][0]}", shape[1:])
        if t is None:
          ok = False
          continue
        buf[i] = t
      if ok:
        params["layers"][key] = place(f"['layers']['{key}']", buf)
      del buf
    for key in ("embed", "final_norm", "lm_head"):
      if key in shapes:
        t = fetch(key, table[key][0], shapes[key])
        if t is not None:
          params[key] = place(f"['{key}']", np.asarray(t, np_dtype))
    unused = sorted(n for n in source.shapes if n not in expected_names and
                    not (config.tie_word_embeddings and n == "lm_head.weight") and
                    not n.endswith("rotary_emb.inv_freq"))
    if unused:
      errors.append(f"unexpected tensors not in the {config.model_type} layout: {unused[:8]}")
    if errors:
      raise CheckpointError(f"checkpoint {path} does not match its config.json:\n  " +
                            "\n  ".join(errors))
  return config, params


def _hf_shape(key: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """HF's shape for one layer's (or a top-level) tensor, computed without allocating it."""
  if key in ("wq", "wk", "wv"):
    return (ours[1] * ours[2], ours[0])
  if key == "wo":
    return (ours[2], ours[0] * ours[1])
  if key in ("bq", "bk", "bv"):
    return (ours[0] * ours[1],)
  if key in ("w_gate", "w_up", "w_down", "lm_head"):
    return tuple(reversed(ours))
  return tuple(ours)


def hf_state_dict(params: Params, config: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """Param pytree -> {HF tensor name: numpy array} in HF's layout (optionally cast to dtype)."""
  table = _hf_layout(config)
  out = {}
  conv = (lambda a: np.asarray(a)) if dtype is None else (
      lambda a: np.asarray(a).astype(np.dtype(jnp.dtype(dtype))))
  for key, arr in params["layers"].items():
    host = conv(jax.device_get(arr))
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{table[key][0]}"] = np.ascontiguousarray(table[key][2](host[i]))
  for key in ("embed", "final_norm", "lm_head"):
    if key in params:
      out[table[key][0]] = np.ascontiguousarray(table[key][2](conv(jax.device_get(params[key]))))
  return out


def foreign_to_hf_checkpoint(path: str | os.PathLike) -> list[str]:
  """Entries of the dir `path` that an HF checkpoint dir would not hold (all of them when it has
  no config.json): what `save_pretrained` refuses to delete."""
  names = sorted(os.listdir(path))
  if "config.json" not in names:
    return names
  foreign = []
  for n in names:
    is_dir = os.path.isdir(os.path.join(path, n))
    if (n not in _HF_DIRS) if is_dir else not _HF_FILES.match(n):
      foreign.append(n + "/" if is_dir else n)
  return foreign


def save_pretrained(params: Params, config: ModelConfig, path: str | os.PathLike, *,
                    dtype=None, max_shard_bytes: int | None = None, tokenizer: Any = None,
                    overwrite: bool = False) -> str:
  """Writes an HF checkpoint dir that `transformers.AutoModelForCausalLM` loads.

  The dir appears atomically (`io_atomic.atomic_dir`: written under a temp name in the same
  parent, then swapped in; a failure at any point leaves the previous checkpoint whole). With
  `max_shard_bytes` the weights are split into `model-0000i-of-0000n.safetensors` plus an index
  json. `tokenizer` (an HF tokenizer) is saved alongside when given.

  Args:
    params: the param pytree (docs/design.md); config: its ModelConfig.
    path: the checkpoint dir; its parent is created.
    dtype: optional storage dtype.
    overwrite: replace an existing checkpoint at `path` (default False, the library-wide
      default: see `cast_jax.io_atomic`). Even then a dir holding anything but checkpoint files
      (notes, eval results, subdirs), the current directory and its ancestors are refused.

  Returns:
    path.

  Raises:
    FileExistsError: `path` holds a checkpoint and overwrite is False.
    io_atomic.UnsafeWriteError: `path` is not a checkpoint dir this function may replace.
  """
  # The target is checked on entry, before the weights are gathered to the host.
  with io_atomic.atomic_dir(path, kind="HF checkpoint", overwrite=overwrite,
                            recognise=foreign_to_hf_checkpoint) as tmp:
    state = hf_state_dict(params, config, dtype)
    hf_cfg = config.to_hf()
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
    _write_weights(state, tmp, max_shard_bytes)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
  logging.info("saved %s checkpoint to %s", config.model_type, path)
  return os.fspath(path)


def _write_weights(state: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int | None):
  if not max_shard_bytes:
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  shards, current, size = [], {}, 0
  for name, arr in state.items():
    if current and size + arr.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in shard})
  total = sum(a.nbytes for a in state.values())
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
