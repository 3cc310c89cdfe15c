"""weavelm.bench: workloads, agreement, and the bench / ab commands end to end on the tiny model (CPU)."""

from __future__ import annotations

import json
import os

import pytest

from weavelm.bench.ab import agreement
from weavelm.bench.stats import percentile, summarize
from weavelm.bench.workload import load_jsonl, parse_range, random_workload, save_jsonl
from weavelm.cli import main
from weavelm.errors import RequestError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SMALL = ["--num-prompts", "6", "--input-len", "8:40", "--output-len", "4:12", "--quiet"]


def test_random_workload_is_seeded_and_fits_the_model():
    a = random_workload(64, (100, 1024), (100, 1024), vocab_size=512, max_model_len=512, seed=3)
    b = random_workload(64, (100, 1024), (100, 1024), vocab_size=512, max_model_len=512, seed=3)
    assert [i.prompt_token_ids for i in a.items] == [i.prompt_token_ids for i in b.items]
    assert all(0 <= t < 512 for i in a.items for t in i.prompt_token_ids)
    assert all(len(i.prompt_token_ids) + i.max_tokens <= 512 and i.max_tokens >= 1 for i in a.items)
    assert a.num_clipped > 0
    c = random_workload(16, (5, 9), (2, 3), vocab_size=100, max_model_len=512, seed=0)
    assert c.num_clipped == 0
    assert all(5 <= len(i.prompt_token_ids) <= 9 and 2 <= i.max_tokens <= 3 for i in c.items)


def test_parse_range():
    assert parse_range("512") == (512, 512)
    assert parse_range("100:1024") == (100, 1024)
    with pytest.raises(RequestError, match="LO <= HI"):
        parse_range("9:3")


def test_jsonl_round_trip_and_errors(tmp_path):
    wl = random_workload(4, (3, 6), (2, 4), 50, 100, seed=1)
    path = str(tmp_path / "w.jsonl")
    save_jsonl(wl, path)
    back = load_jsonl(path)
    assert [(i.prompt_token_ids, i.max_tokens) for i in back.items] == [
        (i.prompt_token_ids, i.max_tokens) for i in wl.items]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_token_ids": [1, 2], "max_tokens": 0}\n')
    with pytest.raises(RequestError, match=r"bad.jsonl:1: `max_tokens` must be an integer >= 1"):
        load_jsonl(str(bad))


def test_agreement_reports_first_divergence():
    ag = agreement([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert ag["num_identical"] == 1 and ag["identical_share"] == pytest.approx(1 / 3)
    assert ag["first_divergence"] == [None, 1, 2]
    assert ag["first_divergence_min"] == 1


def test_stats():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    s = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s["median"] == pytest.approx(2.0) and s["p99"] == pytest.approx(2.98)
    assert summarize([])["median"] is None


def test_ab_fcfs_vs_priority_writes_json_markdown_png(tiny_llama, tmp_path, capsys):
    out = tmp_path / "ab"
    rc = main(["ab", os.path.join(EXAMPLES, "ab_fcfs.yaml"), os.path.join(EXAMPLES, "ab_priority.yaml"),
               "--model", tiny_llama, "--repeats", "2", "--out", str(out), "--require-agreement", *SMALL])
    assert rc == 0
    r = json.loads((out / "ab.json").read_text())
    assert r["labels"] == ["ab_fcfs", "ab_priority"]
    assert r["order"] == ["ab_fcfs#1", "ab_priority#1", "ab_fcfs#2", "ab_priority#2"]
    assert r["configs"]["ab_fcfs"]["scheduler"]["name"] == "fcfs"
    assert r["configs"]["ab_priority"]["scheduler"]["name"] == "priority"
    assert r["workload"]["num_requests"] == 6 and len(r["runs"]) == 4
    for key in ("output_tok_s", "total_tok_s", "req_s", "wall_s", "ttft_median_ms", "tpot_median_ms",
                "e2e_median_ms"):
        fig = r["figures"][key]
        assert len(fig["ab_fcfs"]["values"]) == 2 and fig["ab_fcfs"]["median"] > 0
        assert fig["ratio_b_over_a"] == pytest.approx(fig["ab_priority"]["median"] / fig["ab_fcfs"]["median"])
    assert all(run["num_errors"] == 0 for run in r["runs"])
    # all requests have priority 0: both schedulers build the same batches, so greedy outputs must be identical
    assert r["agreement"]["identical_share"] == 1.0
    assert r["agreement"]["first_divergence"] == [None] * 6
    assert r["repeat_agreement"] == {"ab_fcfs": 1.0, "ab_priority": 1.0}
    md = (out / "ab.md").read_text()
    assert "| output tok/s |" in md and "6/6 requests identical (100.0%)" in md
    import matplotlib.image
    img = matplotlib.image.imread(str(out / "ab.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not blank
    assert "identical" in capsys.readouterr().out


def test_ab_reports_disagreement_of_different_weights(tiny_llama, tmp_path):
    out = tmp_path / "ab"
    rc = main(["ab", os.path.join(EXAMPLES, "ab_fcfs.yaml"), os.path.join(EXAMPLES, "ab_fcfs.yaml"),
               "--model", tiny_llama, "--set", "loader.name=dummy", "--set-a", "loader.seed=0",
               "--set-b", "loader.seed=1", "--set", "loader.std=0.3", "--repeats", "1", "--out", str(out),
               "--require-agreement", "--num-prompts", "3", "--input-len", "8", "--output-len", "6", "--quiet"])
    assert rc == 1
    r = json.loads((out / "ab.json").read_text())
    assert r["labels"] == ["A", "B"]
    assert r["agreement"]["identical_share"] < 1.0
    assert r["agreement"]["first_divergence_min"] is not None


def test_bench_throughput_writes_json(tiny_llama, tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = main(["bench", "throughput", "--model", tiny_llama, "--dtype", "float32", "--device", "cpu",
               "--out", str(out), *SMALL])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["num_requests"] == 6 and r["num_errors"] == 0
    assert r["output_tokens"] == r["workload"]["max_output_tokens"]  # ignore_eos: every request runs to length
    assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"] and r["req_s"] > 0 and r["wall_s"] > 0
    assert "output tok/s" in capsys.readouterr().out


def test_bench_throughput_jsonl_workload(tiny_llama, tmp_path):
    wl = tmp_path / "w.jsonl"
    wl.write_text('{"prompt_token_ids": [5, 6, 7], "max_tokens": 3}\n\n{"prompt_token_ids": [9], "output_len": 2}\n')
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--model", tiny_llama, "--device", "cpu", "--workload", str(wl),
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["num_requests"] == 2 and r["output_tokens"] == 5 and r["prompt_tokens"] == 4


def test_bench_latency_writes_percentiles(tiny_llama, tmp_path, capsys):
    out = tmp_path / "l.json"
    rc = main(["bench", "latency", "--model", tiny_llama, "--device", "cpu", "--batch-sizes", "1,2",
               "--input-len", "8", "--output-len", "4", "--iters", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [c["batch_size"] for c in r["cases"]] == [1, 2]
    c = r["cases"][1]
    assert c["ttft_ms"]["n"] == 4 and c["tpot_ms"]["n"] == 4 and c["itl_ms"]["n"] == 12
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert 0 < c[k]["median"] <= c[k]["p90"] <= c[k]["p99"]
    assert "TTFT" in capsys.readouterr().out


def test_latency_rejects_lengths_past_the_context(tiny_llama, capsys):
    rc = main(["bench", "latency", "--model", tiny_llama, "--device", "cpu", "--batch-sizes", "1",
               "--input-len", "500", "--output-len", "100", "--quiet"])
    assert rc == 2
    assert "exceeds max_model_len 512" in capsys.readouterr().err


def test_ab_of_two_attention_backends_agrees(tiny_llama, tmp_path):
    """torch_ref vs triton (Triton's CPU interpreter, in a child process so the env var precedes any triton
    import): the two backends must produce identical greedy outputs."""
    import subprocess
    import sys

    a, b = tmp_path / "ref.yaml", tmp_path / "triton.yaml"
    a.write_text("# A: torch_ref on CPU\nattention: torch_ref\ndtype: float32\ndevice: cpu\nloader: safetensors\n")
    b.write_text("# B: triton (interpreted) on CPU\nattention: triton\ndtype: float32\ndevice: cpu\nloader: safetensors\n")
    out = tmp_path / "ab"
    root = os.path.dirname(EXAMPLES)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    res = subprocess.run([sys.executable, "-m", "weavelm.cli", "ab", str(a), str(b), "--model", tiny_llama,
                          "--num-prompts", "3", "--input-len", "8:24", "--output-len", "4:6", "--repeats", "1",
                          "--require-agreement", "--out", str(out), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((out / "ab.json").read_text())
    assert result["agreement"]["identical_share"] == 1.0
