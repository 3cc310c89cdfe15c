"""`weavelm generate` and `weavelm plugins` as a user runs them."""

import re

from weavelm.cli import main


def test_generate_prints_text(smol_tokenizer_model, capsys, tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("# test\ndtype: float32\ndevice: cpu\nscheduler: {name: fcfs, max_num_seqs: 2}\n")
    rc = main(["generate", "--config", str(cfg), "--model", smol_tokenizer_model, "--set", "loader=safetensors",
               "--set", "scheduler.max_num_batched_tokens=16", "--prompt", "Hello", "--max-tokens", "5",
               "--ignore-eos"])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")
    stats = captured.err.strip().splitlines()[-1]
    assert re.match(r"\[weavelm\] 5 tokens in [\d.]+ s \([\d.]+ tok/s\), time to first token \d+ ms", stats), stats
    rc = main(["generate", "--config", str(cfg), "--model", smol_tokenizer_model, "--prompt", "Hello",
               "--max-tokens", "2", "-q"])
    assert rc == 0 and "[weavelm]" not in capsys.readouterr().err


def test_generate_stream_and_bad_option(smol_tokenizer_model, capsys):
    rc = main(["generate", "--model", smol_tokenizer_model, "--device", "cpu", "--prompt", "Hi",
               "--max-tokens", "3", "--stream", "--ignore-eos"])
    assert rc == 0
    rc = main(["generate", "--model", smol_tokenizer_model, "--set", "scheduler.max_num_seqs=0", "--prompt", "x"])
    assert rc == 2
    assert "scheduler.max_num_seqs: Input should be greater than or equal to 1 (got 0)" in capsys.readouterr().err


def test_plugins_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("fcfs", "priority", "uniproc", "torch_ref", "safetensors", "llama", "qwen3"):
        assert name in out
