"""Issue 15, deliverable 8: the CLI as a new user meets it."""

import pytest
import torch

from weavelm import __version__
from weavelm.cli import build_parser, engine_config_from_args, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"weavelm {__version__}"


def test_sampling_flags_are_validated_before_the_model_loads(capsys, tmp_path):
    rc = main(["generate", "--model", str(tmp_path / "no-such-model"), "--max-tokens", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "SamplingParams.max_tokens: must be an integer in [1, 2**31-1]" in err
    assert "no-such-model" not in err
    assert main(["generate", "--model", str(tmp_path / "x"), "--temperature", "-1"]) == 2
    assert "SamplingParams.temperature" in capsys.readouterr().err


def test_generate_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 64; SamplingParams' own default is 16" in out
    assert "0 is greedy (default: 0; SamplingParams' own default is 1.0)" in out


def test_prompts_run_as_one_batch_and_echo_alike_with_stream(smol_tokenizer_model, capsys, monkeypatch):
    from weavelm.core.llm import LLM

    calls = []
    real = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, *a, **k: calls.append(len(prompts)) or
                        real(self, prompts, *a, **k))
    base = ["generate", "--model", smol_tokenizer_model, "--device", "cpu", "--max-tokens", "4", "--ignore-eos",
            "--prompt", "Hello", "--prompt", "The sky"]
    assert main(base) == 0
    batched = capsys.readouterr().out
    assert calls == [2]
    lines = batched.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Hello") and lines[1].startswith("The sky")
    assert main(base + ["--stream"]) == 0
    assert capsys.readouterr().out == batched


def test_n_prints_every_completion(smol_tokenizer_model, capsys):
    assert main(["generate", "--model", smol_tokenizer_model, "--device", "cpu", "--max-tokens", "3", "--n", "3",
                 "--temperature", "1", "--seed", "1", "--ignore-eos", "--prompt", "Hi"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("Hi") for line in lines)


def test_vllm_engine_flags_map_onto_sections(tmp_path, capsys):
    args = build_parser().parse_args(["generate", "--max-num-seqs", "3", "--gpu-memory-utilization", "0.5",
                                      "--no-enable-prefix-caching", "--block-size", "8", "--max-model-len", "64",
                                      "--num-gpu-blocks-override", "9", "--enforce-eager"])
    c = engine_config_from_args(args)
    assert (c.scheduler.max_num_seqs, c.cache.gpu_memory_utilization, c.cache.enable_prefix_caching,
            c.cache.block_size, c.max_model_len, c.cache.num_blocks, c.enforce_eager) == (3, 0.5, False, 8, 64, 9,
                                                                                           True)
    cfg = tmp_path / "e.yaml"
    cfg.write_text("# test\nexecutor: uniproc\n")
    with pytest.raises(Exception, match="executor.tensor_parallel_size: the uniproc executor runs one worker"):
        engine_config_from_args(build_parser().parse_args(["generate", "--config", str(cfg),
                                                           "--tensor-parallel-size", "2"]))
    assert main(["generate", "--trust-remote-code", "--model", str(tmp_path)]) == 2
    assert "trust_remote_code: weavelm never runs code shipped with a model" in capsys.readouterr().err


def test_convert_refuses_to_overwrite_without_force(tiny_llama, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", tiny_llama, str(dst), "--to", "safetensors"]) == 2
    assert "already exists; choose a new output path or pass --force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine" and not (dst / "config.json").exists()
    assert main(["convert", tiny_llama, str(dst), "--to", "safetensors", "--force"]) == 0
    assert (dst / "config.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", tiny_llama, str(empty), "--to", "safetensors"]) == 0


def test_plugins_sorted_with_can_run_status(capsys):
    assert main(["plugins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    rows = [r for r in rows if r[0] != "?"]
    keys = [(r[0], r[1]) for r in rows]
    assert keys == sorted(keys)
    status = {r[1]: " ".join(r[5:]) for r in rows if r[0] == "attention"}
    assert status["torch_ref"] == "ok"
    if not torch.cuda.is_available():
        assert status["flash_attn"].startswith("cannot run here (cpu, float32): device 'cpu'")
        assert status["triton"].startswith("cannot run here")
    assert all(" ".join(r[5:]) == "ok" for r in rows if r[0] in ("scheduler", "loader"))


def test_serve_runs_the_engine_core_in_its_own_process_on_gpu_only(tmp_path, monkeypatch):
    from weavelm.serve import cli as serve_cli

    def decide(argv, cuda):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        args = build_parser().parse_args(["serve", *argv])
        return serve_cli._engine_process_by_default(args, engine_config_from_args(args))

    assert decide(["--device", "cuda"], cuda=True) is True  # vLLM's layout: HTTP never shares the core's GIL
    assert decide(["--device", "auto"], cuda=True) is True
    assert decide(["--device", "cpu"], cuda=True) is False  # the two processes would share the same cores
    assert decide(["--device", "auto"], cuda=False) is False
    assert decide(["--device", "cuda", "--set", "engine_process=false"], cuda=True) is False  # explicit wins
    cfg = tmp_path / "e.yaml"
    cfg.write_text("engine_process: false\n")
    assert decide(["--device", "cuda", "--config", str(cfg)], cuda=True) is False
