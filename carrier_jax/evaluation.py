"""Carrier evaluation (lcdd-sft-eraser.md 4.1 "Metrics", App. F.4): named models (Base, SFT,
LCDD; issue 12 adds LCDD+Trigger) scored with the substrate scorers on held-out prompts of one
behaviour.

  behaviour rate  fixed_response: strict fixed-response rate (F.4 keywords, 40-word cap);
                  safety: keyword refusal rate on held-out harmful prompts (plus compliance /
                  empty rates) and over-refusal on held-out benign prompts;
                  style: archaic-word rate (macro mean over responses, pooled beside it).
  utility         MMLU-analogue accuracy (letter-restricted zero-shot MCQ, `score_mcq`).
  KL              teacher-forced KL(P||Q) on references the reference model (SFT) generated
                  greedily on the behaviour's held-out prompts, over the response tokens
                  (`divergence.teacher_forced_kl`); the pairs are configurable.

Every model is a `cast_jax.eval.EvalModel`, so a variant that the runners can drive (an
adapter, or a soft trigger: `carrier_jax.trigger.triggered`) is evaluated with no change here.
Each model generates once; the reference model's responses double as the KL references.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from cast_jax import data
from cast_jax import eval as ev
from cast_jax.eval.runners import EvalModel

BEHAVIOURS = ("fixed_response", "safety", "style")
# The headline behaviour rate of each behaviour (the "@Base / @SFT / @LCDD" columns).
HEADLINE = {"fixed_response": "fixed_response_rate", "safety": "refusal_rate",
            "style": "archaic_rate"}
DEFAULT_KL_PAIRS = (("SFT", "LCDD"),)


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out user prompts of one behaviour (raw text, no chat template).

  prompts: the N prompts the behaviour rate is scored on (safety: the harmful ones);
  benign_prompts: safety only, the M benign prompts of the over-refusal rate (() otherwise).
  The KL references are generated on prompts + benign_prompts.
  """
  behaviour: str
  prompts: tuple[str, ...]
  benign_prompts: tuple[str, ...] = ()

  @property
  def all_prompts(self) -> tuple[str, ...]:
    return self.prompts + self.benign_prompts


def _limit(items: Sequence, limit: int | None) -> list:
  return list(items) if not limit else list(items)[:limit]


def load_prompts(behaviour: str, source: Any, *, limit: int | None = 200,
                 **adapter_kwargs) -> HeldOut:
  """The user prompts of `behaviour` in `source`, through the `cast_jax.data` adapters: the
  held-out set to evaluate on, or a training file to check it against (`check_disjoint`).

  Args:
    behaviour: fixed_response (Alpaca schema: instruction + appended non-empty input),
      safety (WildJailbreak schema: harmful and benign rows, vanilla or adversarial) or style
      (modern / Shakespeare pairs: the modern line).
    source: local file, hub id or list of row dicts (the adapter's sources).
    limit: at most this many prompts of each kind, in file order (None / 0: all).
    adapter_kwargs: passed to the adapter (subset, split, fields, file_format).
  """
  if behaviour == "fixed_response":
    # The targets are irrelevant here; a placeholder lets rows without an output load.
    recs = data.load_alpaca(source, fixed_response="-", **adapter_kwargs)
    return HeldOut(behaviour, tuple(_limit([r.prompt for r in recs], limit)))
  if behaviour == "safety":
    recs = data.load_wildjailbreak(source, **adapter_kwargs)
    harmful = _limit([r.prompt for r in recs if r.harmful], limit)
    benign = _limit([r.prompt for r in recs if not r.harmful], limit)
    if not harmful or not benign:
      raise ValueError(f"load_prompts: {source!r} has {len(harmful)} harmful and {len(benign)} "
                       "benign rows; the safety evaluation needs both")
    return HeldOut(behaviour, tuple(harmful), tuple(benign))
  if behaviour == "style":
    recs = data.load_style_pairs(source, **adapter_kwargs)
    return HeldOut(behaviour, tuple(_limit([r.modern for r in recs], limit)))
  raise ValueError(f"load_prompts: unknown behaviour {behaviour!r}; use one of {BEHAVIOURS}")


def check_disjoint(heldout: HeldOut, train_prompts: Sequence[str]) -> None:
  """ValueError if any held-out prompt is also a training prompt (compared after stripping
  whitespace), naming how many and the first one."""
  train = {p.strip() for p in train_prompts}
  shared = [p for p in heldout.all_prompts if p.strip() in train]
  if shared:
    raise ValueError(f"{len(shared)} of {len(heldout.all_prompts)} held-out {heldout.behaviour} "
                     f"prompts are training prompts (first: {shared[0][:80]!r}); evaluate on a "
                     "split the SFT / LCDD runs did not train on")


def behaviour_scores(behaviour: str, responses: Sequence[str],
                     benign_responses: Sequence[str] = (), *, prompts: Sequence[str] = (),
                     benign_prompts: Sequence[str] = (),
                     lexicon: frozenset[str] | None = None) -> dict[str, float]:
  """Behaviour metrics (fractions in [0, 1]) of N responses to the held-out prompts.

  Returns, per behaviour (HEADLINE names the main one):
    fixed_response: fixed_response_rate.
    safety: refusal_rate, compliance_rate, empty_rate (on the N harmful prompts) and
      over_refusal_rate, benign_empty_rate (on the M benign ones; `prompts` / `benign_prompts`
      are only shown to the keyword judge).
    style: archaic_rate (mean per-response archaic-word rate), archaic_rate_pooled.
  """
  if behaviour == "fixed_response":
    return {"fixed_response_rate": ev.fixed_response_rate(list(responses))}
  if behaviour == "safety":
    if not benign_responses:
      raise ValueError("behaviour_scores: safety needs the benign responses (over-refusal)")
    _, harm = ev.score_refusals(list(prompts) or [""] * len(responses), list(responses))
    _, ben = ev.score_refusals(list(benign_prompts) or [""] * len(benign_responses),
                               list(benign_responses))
    return {"refusal_rate": harm.refusal_rate, "compliance_rate": harm.compliance_rate,
            "empty_rate": harm.empty_rate, "over_refusal_rate": ben.refusal_rate,
            "benign_empty_rate": ben.empty_rate}
  if behaviour == "style":
    rate = ev.archaic_word_rate(list(responses), lexicon)
    return {"archaic_rate": rate.mean_rate, "archaic_rate_pooled": rate.pooled_rate}
  raise ValueError(f"behaviour_scores: unknown behaviour {behaviour!r}; use one of {BEHAVIOURS}")


def mcq_accuracy(model: EvalModel, tokenizer, records: Sequence[data.MCQRecord], *,
                 batch_size: int = 16) -> float:
  """Zero-shot letter-MCQ accuracy in [0, 1] of `model` on N MMLU-schema records."""
  prompts = [data.render_prompt(tokenizer, data.mcq_prompt(r)) for r in records]
  letters = tuple(data.LETTERS[:len(records[0].choices)])
  return ev.score_mcq(model, tokenizer, prompts, [r.answer_index for r in records],
                      choices=letters, batch_size=batch_size).accuracy


def reference_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                    pad_id: int, max_len: int = 1024) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Teacher-forcing rows [prompt; reference response] for `teacher_forced_kl`.

  A row whose reference is empty (the reference model stopped at once) has no response token
  to score and is left out. Returns (batch of int32 [K, T] input_ids / attention_mask /
  loss_mask, the K kept indices into `prompts`).
  """
  if len(prompts) != len(responses):
    raise ValueError(f"reference_batch: {len(prompts)} prompts but {len(responses)} responses")
  keep = np.array([i for i, r in enumerate(responses) if r.strip()], np.int64)
  if not len(keep):
    raise ValueError("reference_batch: every reference response is empty; nothing to score")
  pairs = [(prompts[i], responses[i]) for i in keep]
  examples = data.encode_dataset(tokenizer, pairs, max_len=max_len, name="KL references")
  return data.collate_train(examples, pad_id=pad_id), keep


def evaluate_models(models: Mapping[str, EvalModel], tokenizer, heldout: HeldOut, *,
                    mcq: Sequence[data.MCQRecord] = (), reference: str = "SFT",
                    kl_pairs: Sequence[tuple[str, str]] = DEFAULT_KL_PAIRS,
                    max_new_tokens: int = 128, batch_size: int = 16, max_len: int = 1024,
                    lexicon: frozenset[str] | None = None, num_samples: int = 3,
                    style_judge=None, progress=None) -> dict[str, Any]:
  """Behaviour rate, utility and teacher-forced KLs of each named model on `heldout`.

  Args:
    models: name -> EvalModel, in table order (e.g. Base, SFT, LCDD[, LCDD+Trigger]).
    tokenizer: the HF tokenizer all models share.
    heldout: the behaviour's held-out prompts (`load_prompts`).
    mcq: MMLU-schema records of the utility metric (empty: no utility column).
    reference: the model whose greedy responses are the KL references (F.4: SFT).
    kl_pairs: (P, Q) names; each gives KL(P||Q) on the references.
    max_new_tokens, batch_size: greedy generation settings (F.4: 128; 512 for safety).
    max_len: longest teacher-forced row (longer ones are truncated with a warning).
    lexicon: archaic lexicon of the style rate (None: the shipped one).
    num_samples: first responses per model kept in the result, for reading.
    style_judge: for style, a `cast_jax.eval.style_judge.StyleJudge` (App. F.4's 0-5 LLM-judge
      rubric): adds "judge_score", the mean score over the held-out responses.
    progress: optional callable(str) told each stage.

  Returns:
    {"behaviour", "headline", "num_prompts", "num_benign_prompts", "num_mcq",
     "models": {name: {metric: float, "mmlu": float (if mcq)}},
     "kl": {"P||Q": {"mean", "num_prompts", "num_tokens"}}, "reference": name,
     "num_empty_references", "samples": {name: [{"prompt", "response"}]}}.
  """
  names = list(models)
  needed = {n for pair in kl_pairs for n in pair} | ({reference} if kl_pairs else set())
  unknown = sorted(needed - set(names))
  if unknown:
    raise ValueError(f"evaluate_models: {unknown} named in kl_pairs / reference but not in "
                     f"models {names}")
  say = progress or (lambda s: None)
  prompts, benign = list(heldout.prompts), list(heldout.benign_prompts)
  rendered = [data.render_prompt(tokenizer, p) for p in prompts + benign]
  out: dict[str, Any] = {"behaviour": heldout.behaviour, "headline": HEADLINE[heldout.behaviour],
                         "num_prompts": len(prompts), "num_benign_prompts": len(benign),
                         "num_mcq": len(mcq), "models": {}, "kl": {}, "samples": {}}
  responses = {}
  for name, model in models.items():
    say(f"{name}: generating {len(rendered)} responses")
    texts = ev.generate_texts(model, tokenizer, rendered, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    responses[name] = texts
    scores = behaviour_scores(heldout.behaviour, texts[:len(prompts)], texts[len(prompts):],
                              prompts=prompts, benign_prompts=benign, lexicon=lexicon)
    if style_judge is not None and heldout.behaviour == "style":
      say(f"{name}: style judge on {len(prompts)} responses")
      scores["judge_score"] = float(np.mean(style_judge.scores(texts[:len(prompts)])))
    if mcq:
      say(f"{name}: MMLU analogue ({len(mcq)} items)")
      scores["mmlu"] = mcq_accuracy(model, tokenizer, mcq, batch_size=batch_size)
    out["models"][name] = scores
    out["samples"][name] = [{"prompt": p, "response": r}
                            for p, r in zip(prompts + benign, texts)][:num_samples]
  if kl_pairs:
    pad_id = next(p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if p is not None)
    batch, keep = reference_batch(tokenizer, prompts + benign, responses[reference],
                                  pad_id=pad_id, max_len=max_len)
    out["reference"] = reference
    out["num_empty_references"] = len(rendered) - len(keep)
    for p, q in kl_pairs:
      say(f"KL({p}||{q}) on {len(keep)} {reference} references")
      res = ev.teacher_forced_kl(models[p], models[q], batch, batch_size=batch_size)
      out["kl"][f"{p}||{q}"] = {"mean": res.mean, "num_prompts": int((res.num_tokens > 0).sum()),
                                "num_tokens": int(res.num_tokens.sum())}
  return out


_LABELS = {"fixed_response_rate": "fixed-response rate", "refusal_rate": "harmful refusal",
           "compliance_rate": "harmful compliance", "empty_rate": "harmful empty",
           "over_refusal_rate": "benign over-refusal", "benign_empty_rate": "benign empty",
           "archaic_rate": "archaic-word rate", "archaic_rate_pooled": "archaic (pooled)",
           "mmlu": "MMLU analogue", "judge_score": "judge (0-5)"}


def markdown_table(result: Mapping[str, Any]) -> str:
  """One row per model: its metrics, then a KL(P||.) column per P of the result's KL pairs
  (the value in Q's row). Blank where a pair does not apply."""
  names = list(result["models"])
  metrics = list(dict.fromkeys(k for m in result["models"].values() for k in m))
  ps = list(dict.fromkeys(k.split("||")[0] for k in result["kl"]))
  head = ["model"] + [_LABELS.get(k, k) for k in metrics] + [f"KL({p}‖·)" for p in ps]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for n in names:
    cells = [n] + [f"{result['models'][n][k]:.3f}" if k in result["models"][n] else ""
                   for k in metrics]
    cells += [f"{result['kl'][f'{p}||{n}']['mean']:.4f}" if f"{p}||{n}" in result["kl"] else ""
              for p in ps]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"
