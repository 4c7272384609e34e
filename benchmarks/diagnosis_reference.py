"""The CAST diagnosis (cast.md section 3) as a user would write it from the paper with HF
transformers (PyTorch): the reference `bench_diagnosis.py` times and checks the library against.

A head is ablated by a forward pre-hook on its layer's o_proj that zeroes the head's slice of
o_proj's input (the head's attention output); the sweeps loop over heads in Python and batch
the prompts. Nothing here imports the library's diagnosis code: only the keyword refusal judge
(`cast_jax.eval.refusal`), which both sides must share for their decisions to be comparable.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F


def _zero_head_hook(head, head_dim):
  def hook(module, args):
    x = args[0].clone()
    x[..., head * head_dim:(head + 1) * head_dim] = 0.0
    return (x,)
  return hook


@contextlib.contextmanager
def ablated(hf, head):
  """hf with query head `head` = (layer, h) zeroed at o_proj's input; head None: unchanged."""
  handle = None
  if head is not None:
    layer, h = head
    o_proj = hf.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(_zero_head_hook(h, hf.config.head_dim))
  try:
    yield hf
  finally:
    if handle is not None:
      handle.remove()


def _left_pad(rows, pad, device="cpu"):
  """Token lists -> input_ids, attention_mask, position_ids: torch int64 [B, P], left padded,
  on `device`."""
  P = max(len(r) for r in rows)
  ids = torch.full((len(rows), P), pad, dtype=torch.long)
  mask = torch.zeros((len(rows), P), dtype=torch.long)
  for i, r in enumerate(rows):
    ids[i, P - len(r):] = torch.tensor(r)
    mask[i, P - len(r):] = 1
  return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


def _batches(items, size):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _q_grads(hf, examples, batch_size, pad):
  """Gradient of (summed response-token CE / target tokens) w.r.t. each layer's q_proj weight.

  Args: examples [(input_ids [T], loss_mask [T])]. Returns float32 [L, H*Dh, D] (torch layout).
  """
  for p in hf.parameters():
    p.requires_grad_(False)
  qs = [layer.self_attn.q_proj.weight for layer in hf.model.layers]
  for q in qs:
    q.requires_grad_(True)
    q.grad = None
  count = 0
  for chunk in _batches(list(examples), batch_size):
    T = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), T), pad, dtype=torch.long)
    attn = torch.zeros((len(chunk), T), dtype=torch.long)
    labels = torch.full((len(chunk), T), -100, dtype=torch.long)
    for i, (row, loss_mask) in enumerate(chunk):
      ids[i, :len(row)] = torch.tensor(np.asarray(row, np.int64))
      attn[i, :len(row)] = 1
      keep = torch.tensor(np.asarray(loss_mask) > 0)
      labels[i, :len(row)] = torch.where(keep, ids[i, :len(row)], -100)
    logits = hf(input_ids=ids.to(hf.device), attention_mask=attn.to(hf.device)).logits
    labels = labels.to(hf.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    loss.backward()
    count += int((labels[:, 1:] != -100).sum())
  grads = torch.stack([q.grad.float() / count for q in qs])
  for q in qs:
    q.requires_grad_(False)
    q.grad = None
  return grads


def conflict_o(hf, safe_examples, util_examples, batch_size, pad):
  """O(h) = (1 - cos(g_safe(h), g_util(h))) / 2, Eq. 2, per query head: float64 [L, H]."""
  g_safe = _q_grads(hf, safe_examples, batch_size, pad).double()
  g_util = _q_grads(hf, util_examples, batch_size, pad).double()
  L, H = g_safe.shape[0], hf.config.num_attention_heads
  a, b = g_safe.reshape(L, H, -1), g_util.reshape(L, H, -1)  # a head's rows of q_proj.weight
  cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
  return ((1.0 - cos) / 2.0).cpu().numpy()


@torch.inference_mode()
def _letter_predictions(hf, prompt_ids, choice_ids, batch_size, pad):
  preds = []
  for start in range(0, len(prompt_ids), batch_size):
    ids, mask, pos = _left_pad(prompt_ids[start:start + batch_size], pad, hf.device)
    last = hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
    letters = torch.as_tensor(np.asarray(choice_ids[start:start + len(ids)], np.int64),
                              device=hf.device)
    preds.append(last.gather(1, letters).argmax(-1).cpu().numpy())
  return np.concatenate(preds).astype(np.int32)


def mcq_loop(hf, prompt_ids, choice_ids, heads, batch_size, pad):
  """Letter-restricted argmax at the last prompt position, base and with each head zeroed.

  Returns (base int32 [N], ablated int32 [len(heads), N]).
  """
  base = _letter_predictions(hf, prompt_ids, choice_ids, batch_size, pad)
  out = np.zeros((len(heads), len(prompt_ids)), np.int32)
  for i, head in enumerate(heads):
    with ablated(hf, head):
      out[i] = _letter_predictions(hf, prompt_ids, choice_ids, batch_size, pad)
  return base, out


@torch.inference_mode()
def responses(hf, tok, prompt_ids, batch_size, gen_len, pad, eos):
  """Greedy responses (left-padded batches, `hf.generate`), cut before the first EOS, decoded
  with special tokens skipped: N strings."""
  texts = []
  for start in range(0, len(prompt_ids), batch_size):
    ids, mask, _ = _left_pad(prompt_ids[start:start + batch_size], pad, hf.device)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len,
                      do_sample=False, eos_token_id=eos, pad_token_id=pad)
    for row in out[:, ids.shape[1]:].tolist():
      row = row[:row.index(eos)] if eos in row else row
      texts.append(tok.decode(row, skip_special_tokens=True))
  return texts


def _refusals(hf, tok, prompt_ids, batch_size, gen_len, pad, eos):
  from cast_jax.eval.refusal import Verdict, score_refusals
  texts = responses(hf, tok, prompt_ids, batch_size, gen_len, pad, eos)
  verdicts, _ = score_refusals([""] * len(texts), texts)
  return np.asarray([v is Verdict.REFUSED for v in verdicts])


def refusal_loop(hf, tok, prompt_ids, heads, batch_size, gen_len, pad, eos):
  """Keyword-judged refusals of greedy generations, base and with each head zeroed.

  Returns (base bool [N], ablated bool [len(heads), N]).
  """
  base = _refusals(hf, tok, prompt_ids, batch_size, gen_len, pad, eos)
  out = np.zeros((len(heads), len(prompt_ids)), bool)
  for i, head in enumerate(heads):
    with ablated(hf, head):
      out[i] = _refusals(hf, tok, prompt_ids, batch_size, gen_len, pad, eos)
  return base, out


def conflict_scores(o, h_gen, h_safe):
  """C = O * exp(rank(H_gen) - rank(H_safe)), Eqs. 5-6, with average-rank percentiles in [0, 1]
  (scipy's rankdata): any-shaped arrays of the same size -> float64, flattened."""
  from scipy.stats import rankdata
  pct = lambda v: (rankdata(np.ravel(v), method="average") - 1) / (np.size(v) - 1)
  return np.ravel(o) * np.exp(pct(h_gen) - pct(h_safe))
