"""The conflict-map record, buckets.json, heatmaps and summary (`diagnosis.report`) against
numbers recomputed here by hand rules from the same inputs."""

import json

import numpy as np
import pytest

from cast_jax.diagnosis import report, scores

L, H, M = 3, 5, 4  # N = 15 heads: M does not divide N


def _hand_percentiles(values):
  """Rank of v = #(< v) + (#(== v) - 1) / 2 (0-based average rank), scaled by N - 1."""
  flat = [float(v) for v in np.ravel(values)]
  n = len(flat)
  out = [(sum(u < v for u in flat) + (sum(u == v for u in flat) - 1) / 2) / (n - 1)
         for v in flat]
  return np.asarray(out).reshape(np.shape(values))


def _hand_buckets(c, m):
  """Sorted by (-C, flat index); bucket i takes positions [floor(i N / m), floor((i+1) N / m))."""
  flat = list(np.ravel(c))
  order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
  n = len(flat)
  return [order[(i * n) // m:((i + 1) * n) // m] for i in range(m)]


@pytest.fixture(scope="module")
def inputs():
  rs = np.random.RandomState(0)
  o = rs.uniform(0.2, 0.8, (L, H))
  o[2, 4] = o[0, 0]  # a tie in O
  # Ablation deltas are multiples of 1/n_items: many ties, as on real calibration sets.
  h_gen = rs.randint(0, 4, (L, H)) / 10
  h_safe = rs.randint(0, 3, (L, H)) / 10
  cos = 1 - 2 * o
  frac_safe, frac_util = rs.uniform(0, 1, (L, H)), rs.uniform(0, 1, (L, H))
  sc = scores.score_heads(o, h_gen, h_safe, m=M)
  record = report.conflict_map(sc, cos, frac_safe, frac_util, base_accuracy=0.75,
                               base_refusal_rate=0.5, num_buckets=M,
                               model={"name": "toy", "num_layers": L},
                               calibration={"n_safe": 10, "n_util": 10, "seed": 3})
  return dict(o=o, h_gen=h_gen, h_safe=h_safe, cos=cos, frac_safe=frac_safe,
              frac_util=frac_util, sc=sc, record=record)


def test_hand_percentile_rule_on_a_literal_example():
  # values [3, 1, 1, 2]: ordinal ranks 4, (1+2)/2, (1+2)/2, 3 -> (r - 1) / 3.
  np.testing.assert_allclose(_hand_percentiles([3, 1, 1, 2]), [1, 1 / 6, 1 / 6, 2 / 3])
  np.testing.assert_allclose(scores.percentile_ranks([3, 1, 1, 2]), [1, 1 / 6, 1 / 6, 2 / 3])


def test_per_head_fields_equal_independent_numbers(inputs):
  heads = inputs["record"]["heads"]
  assert set(heads) == set(report.PER_HEAD_FIELDS)
  for name in report.PER_HEAD_FIELDS:
    assert np.shape(heads[name]) == (L, H), name
  for name, want in (("cos", inputs["cos"]), ("o", inputs["o"]), ("h_gen", inputs["h_gen"]),
                     ("h_safe", inputs["h_safe"]), ("conflict_fraction_safe", inputs["frac_safe"]),
                     ("conflict_fraction_util", inputs["frac_util"])):
    np.testing.assert_array_equal(np.asarray(heads[name]), want, err_msg=name)
  rank_gen, rank_safe = _hand_percentiles(inputs["h_gen"]), _hand_percentiles(inputs["h_safe"])
  np.testing.assert_allclose(heads["rank_gen"], rank_gen, rtol=0, atol=1e-12)
  np.testing.assert_allclose(heads["rank_safe"], rank_safe, rtol=0, atol=1e-12)
  s = np.exp(rank_gen - rank_safe)
  np.testing.assert_allclose(heads["s"], s, rtol=1e-12)
  c = inputs["o"] * s
  np.testing.assert_allclose(heads["c"], c, rtol=1e-12)
  want_bucket = np.zeros(L * H, int)
  for i, members in enumerate(_hand_buckets(c, M)):
    want_bucket[members] = i + 1
  np.testing.assert_array_equal(np.asarray(heads["bucket"]).reshape(-1), want_bucket)
  rec = inputs["record"]
  assert rec["base"] == {"accuracy": 0.75, "refusal_rate": 0.5}
  assert (rec["num_layers"], rec["num_heads"], rec["num_heads_total"]) == (L, H, L * H)
  assert rec["calibration"] == {"n_safe": 10, "n_util": 10, "seed": 3}
  flat_c = sorted(range(L * H), key=lambda i: (-c.reshape(-1)[i], i))
  assert rec["rankings"]["c"] == [[i // H, i % H] for i in flat_c]
  flat_o = sorted(range(L * H), key=lambda i: (-inputs["o"].reshape(-1)[i], i))
  assert rec["rankings"]["o"] == [[i // H, i % H] for i in flat_o]


def test_bucket_record_partitions_heads_by_the_floor_rule(inputs):
  c = np.asarray(inputs["record"]["heads"]["c"])
  got = report.bucket_record(c, M)
  assert got["num_buckets"] == M and got["num_heads_total"] == L * H
  hand = _hand_buckets(c, M)
  assert [b["size"] for b in got["buckets"]] == [3, 4, 4, 4]  # floor(i * 15 / 4) bounds
  seen = []
  for b, members in zip(got["buckets"], hand):
    assert b["heads"] == [[i // H, i % H] for i in members]
    assert b["c"] == [float(c.reshape(-1)[i]) for i in members]
    seen += members
  assert sorted(seen) == list(range(L * H))
  # B1 holds the highest C: every C in bucket i is >= every C in bucket i + 1.
  for hi, lo in zip(got["buckets"], got["buckets"][1:]):
    assert hi["c_min"] >= lo["c_max"]
  for m in (1, 5, 15):
    sizes = [b["size"] for b in report.bucket_record(c, m)["buckets"]]
    assert sum(sizes) == L * H and max(sizes) - min(sizes) <= 1


def test_conflict_map_rejects_a_misshapen_table(inputs):
  with pytest.raises(ValueError, match="cos"):
    report.conflict_map(inputs["sc"], np.zeros((L, H + 1)), inputs["frac_safe"],
                        inputs["frac_util"], base_accuracy=0.0, base_refusal_rate=0.0,
                        num_buckets=M, model={}, calibration={})


def test_write_report_round_trips_and_writes_pngs(inputs, tmp_path):
  rec = inputs["record"]
  buckets = report.bucket_record(np.asarray(rec["heads"]["c"]), M)
  paths = report.write_report(str(tmp_path), rec, buckets, {"gradients": 1.5, "mcq_sweep": 2.0})
  assert json.loads((tmp_path / "conflict_map.json").read_text()) == rec
  assert json.loads((tmp_path / "buckets.json").read_text()) == buckets
  for key in ("c", "o", "s"):
    png = (tmp_path / f"heatmap_{key}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert paths[f"heatmap_{key}"].endswith(f"heatmap_{key}.png")
  text = (tmp_path / "summary.md").read_text()
  c = np.asarray(rec["heads"]["c"])
  order = [i for members in _hand_buckets(c, M) for i in members]
  top, bottom = divmod(order[0], H), divmod(order[-1], H)
  assert f"L{top[0]}H{top[1]} ({c.max():.3f})" in text.split("Top")[1].split("\n")[0]
  assert f"L{bottom[0]}H{bottom[1]} ({c.min():.3f})" in text.split("Bottom")[1].split("\n")[0]
  assert f"| {c.min():.4f} |" in text and f"| {c.max():.4f} |" in text
  assert "| gradients | 1.5 |" in text
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cast_jax-tmp")]


def test_kv_head_units_are_named_and_recorded(inputs, tmp_path):
  """A k / v map: U = 5 KV heads per layer, each removing 2 query heads (group 2)."""
  sc = inputs["sc"]
  rec = report.conflict_map(sc, inputs["cos"], inputs["frac_safe"], inputs["frac_util"],
                            base_accuracy=0.5, base_refusal_rate=0.25, num_buckets=M,
                            model={"name": "toy"}, calibration={}, target="v", unit="kv_head",
                            group=2)
  assert (rec["target"], rec["unit"], rec["num_units"], rec["num_units_total"]) == (
      "v", "kv_head", H, L * H)
  assert rec["unit_query_heads"] == [[2 * u, 2 * u + 1] for u in range(H)]
  assert rec["heads"] == inputs["record"]["heads"]  # same tables, only the naming differs
  buckets = report.bucket_record(np.asarray(rec["heads"]["c"]), M, unit="kv_head")
  assert buckets["unit"] == "kv_head" and buckets["num_units_total"] == L * H
  report.write_report(str(tmp_path), rec, buckets)
  text = (tmp_path / "summary.md").read_text()
  assert "target `v` projection" in text and f"{L} layers x {H} KV heads" in text
  c = np.asarray(rec["heads"]["c"])
  top = divmod(_hand_buckets(c, M)[0][0], H)
  assert f"L{top[0]}KV{top[1]} ({c.max():.3f})" in text.split("Top")[1].split("\n")[0]
  with pytest.raises(ValueError, match="unit='query'"):
    report.bucket_record(c, M, unit="query")
