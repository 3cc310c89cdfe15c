"""Issue 29, item 5: vLLM code ports by changing the import. Every argument of vLLM's `LLM(...)` / `EngineArgs` and
`SamplingParams` (vLLM 0.10-0.11) is either implemented or accepted at vLLM's default and refused with a message
saying it is unsupported; `cumulative_logprob`, `Logprob.decoded_token`, `TokensPrompt` and `llm.llm_engine`."""

import math

import pytest

from weavelm import LLM, ConfigError, RequestError, SamplingParams, TextPrompt, TokensPrompt
from weavelm.core.compat import apply_vllm_aliases
from weavelm.core.registry import Registry
from weavelm.inputs import TokensPrompt as InputsTokensPrompt
from weavelm.sampling_params import RequestOutputKind

# vLLM's LLM.__init__ arguments and the EngineArgs fields ported code passes through **kwargs, at vLLM's defaults
# (`runner` / `convert` belong to the pooling work and are left out here).
VLLM_ENGINE_DEFAULTS = {
    "tokenizer": None, "tokenizer_mode": "auto", "skip_tokenizer_init": False, "trust_remote_code": False,
    "allowed_local_media_path": "", "allowed_media_domains": None, "tensor_parallel_size": 1, "dtype": "auto",
    "quantization": None, "revision": None, "tokenizer_revision": None, "seed": 0, "gpu_memory_utilization": 0.9,
    "swap_space": 4, "cpu_offload_gb": 0, "enforce_eager": False, "max_seq_len_to_capture": 8192,
    "disable_custom_all_reduce": False, "disable_async_output_proc": False, "hf_token": None,
    "hf_overrides": None, "mm_processor_kwargs": None, "compilation_config": None, "kv_cache_memory_bytes": None,
    "logits_processors": None, "max_model_len": None, "max_num_seqs": 256, "max_num_batched_tokens": None,
    "block_size": 16, "enable_prefix_caching": True, "enable_chunked_prefill": True, "kv_cache_dtype": "auto",
    "max_logprobs": 20, "disable_log_stats": False, "load_format": "auto", "download_dir": None,
    "distributed_executor_backend": None, "pipeline_parallel_size": 1, "data_parallel_size": 1,
    "enable_expert_parallel": False, "enable_lora": False, "max_loras": 1, "max_lora_rank": 16,
    "max_cpu_loras": None, "lora_dtype": "auto", "fully_sharded_loras": False, "speculative_config": None,
    "num_gpu_blocks_override": None, "scheduling_policy": "fcfs", "async_scheduling": False,
    "generation_config": "auto", "override_generation_config": None, "enable_sleep_mode": False,
    "calculate_kv_scales": False, "limit_mm_per_prompt": None, "code_revision": None, "config_format": "auto",
    "rope_scaling": None, "rope_theta": None, "logprobs_mode": "raw_logprobs", "disable_sliding_window": False,
    "disable_cascade_attn": False, "enable_prompt_embeds": False, "long_prefill_token_threshold": 0,
    "max_num_partial_prefills": 1, "max_long_partial_prefills": 1, "cuda_graph_sizes": None, "worker_cls": "auto",
    "worker_extension_cls": "", "kv_transfer_config": None, "kv_events_config": None, "model_impl": "auto",
    "guided_decoding_backend": "auto", "reasoning_parser": "", "preemption_mode": None, "num_lookahead_slots": 0,
    "hf_config_path": None, "max_parallel_loading_workers": None, "ignore_patterns": None,
    "otlp_traces_endpoint": None, "collect_detailed_traces": None, "served_model_name": None,
    "mm_processor_cache_gb": 4, "enable_multimodal_encoder_data_parallel": False, "lora_extra_vocab_size": 256,
    "kv_sharing_fast_prefill": False, "disable_log_requests": True, "enable_log_requests": False,
    "use_tqdm_on_load": True,
}
# a value other than the default for every argument weavelm does not implement
VLLM_ENGINE_UNSUPPORTED = {
    "tokenizer_mode": "mistral", "skip_tokenizer_init": True, "trust_remote_code": True,
    "allowed_media_domains": ["x.org"], "quantization": "awq",
    "revision": "main", "tokenizer_revision": "main", "cpu_offload_gb": 4, "max_seq_len_to_capture": 1024,
    "disable_async_output_proc": True, "hf_token": "t", "hf_overrides": {"a": 1}, "mm_processor_kwargs": {"a": 1},
    "compilation_config": 3, "kv_cache_memory_bytes": 1 << 30, "logits_processors": ["p"], "kv_cache_dtype": "fp8",
    "max_logprobs": 5, "load_format": "bitsandbytes", "download_dir": "/d", "data_parallel_size": 2,
    "enable_expert_parallel": True, "lora_dtype": "float16", "fully_sharded_loras": True,
    "scheduling_policy": "lottery", "generation_config": "vllm", "override_generation_config": {"a": 1},
    "enable_sleep_mode": True, "calculate_kv_scales": True,
    "code_revision": "x", "config_format": "mistral", "rope_scaling": {"type": "yarn"}, "rope_theta": 1e6,
    "logprobs_mode": "processed_logprobs", "disable_sliding_window": True, "disable_cascade_attn": True,
    "enable_prompt_embeds": True, "max_num_partial_prefills": 2, "max_long_partial_prefills": 2,
    "cuda_graph_sizes": [1, 2], "worker_cls": "my.Worker", "worker_extension_cls": "my.Ext",
    "kv_transfer_config": {"a": 1}, "kv_events_config": {"a": 1}, "model_impl": "transformers",
    "guided_decoding_backend": "outlines", "reasoning_parser": "qwen3", "preemption_mode": "swap",
    "num_lookahead_slots": 2, "hf_config_path": "/c", "max_parallel_loading_workers": 2,
    "ignore_patterns": ["*.bin"], "otlp_traces_endpoint": "http://x", "collect_detailed_traces": ["all"],
    "served_model_name": "m", "mm_processor_cache_gb": 0, "enable_multimodal_encoder_data_parallel": True,
    "lora_extra_vocab_size": 512, "kv_sharing_fast_prefill": True, "enable_log_requests": True,
}
# vLLM's SamplingParams fields at their defaults (guided_decoding: 0.10's name of structured_outputs)
VLLM_SAMPLING_DEFAULTS = {
    "n": 1, "best_of": None, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None, "stop_token_ids": None,
    "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
    "detokenize": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "logits_processors": None, "include_stop_str_in_output": False, "truncate_prompt_tokens": None,
    "output_kind": RequestOutputKind.CUMULATIVE, "output_text_buffer_length": 0, "structured_outputs": None,
    "guided_decoding": None, "logit_bias": None, "allowed_token_ids": None, "extra_args": None, "bad_words": None,
}
VLLM_SAMPLING_UNSUPPORTED = {
    "best_of": 3, "detokenize": False, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "logits_processors": [lambda ids, logits: logits], "output_kind": RequestOutputKind.DELTA,
    "output_text_buffer_length": 4, "guided_decoding": {"regex": "a+"}, "allowed_token_ids": [1, 2],
}


@pytest.fixture(scope="module")
def registry():
    return Registry.load()


def test_every_vllm_engine_argument_is_accepted_at_its_default(registry, tiny_llama):
    assert apply_vllm_aliases({"model": "m", **VLLM_ENGINE_DEFAULTS}, registry)["model"] == "m"
    llm = LLM(tiny_llama, device="cpu", **VLLM_ENGINE_DEFAULTS)
    assert llm.llm_engine is llm.engine
    assert (llm.config.loader.name, llm.config.scheduler.name, llm.config.scheduler.max_num_seqs) == \
        ("auto", "fcfs", 256)
    assert llm.generate([TokensPrompt(prompt_token_ids=[3, 4])], SamplingParams(max_tokens=2))[0].error is None


@pytest.mark.parametrize("name", sorted(VLLM_ENGINE_UNSUPPORTED))
def test_other_vllm_engine_values_are_refused_as_unsupported(registry, name):
    value = VLLM_ENGINE_UNSUPPORTED[name]
    with pytest.raises(ConfigError) as e:
        apply_vllm_aliases({"model": "m", name: value}, registry)
    assert f"{name}: " in str(e.value) and "unsupported" in str(e.value)


def test_implemented_engine_arguments_map_onto_sections(registry):
    raw = apply_vllm_aliases({"load_format": "dummy", "scheduling_policy": "priority", "quantization": "int8"},
                             registry)
    assert raw == {"loader": {"name": "dummy"}, "scheduler": {"name": "priority"}, "quantization": {"name": "int8"}}
    with pytest.raises(ConfigError, match="conflicts with loader.name"):
        apply_vllm_aliases({"load_format": "dummy", "loader": {"name": "safetensors"}}, registry)
    mm = apply_vllm_aliases({"limit_mm_per_prompt": {"image": 1}, "allowed_local_media_path": "/data"}, registry)
    assert mm == {"multimodal": {"limit_mm_per_prompt": {"image": 1}, "allowed_local_media_path": "/data"}}


def test_every_vllm_sampling_argument_is_accepted_at_its_default():
    sp = SamplingParams(**VLLM_SAMPLING_DEFAULTS)
    assert (sp.max_tokens, sp.stop, sp.stop_token_ids, sp.output_kind) == (16, [], [], RequestOutputKind.CUMULATIVE)
    assert SamplingParams(n=2, best_of=2, extra_args={"k": 1}, truncate_prompt_tokens=3).best_of == 2


@pytest.mark.parametrize("name", sorted(VLLM_SAMPLING_UNSUPPORTED))
def test_other_vllm_sampling_values_are_refused_as_unsupported(name):
    with pytest.raises(RequestError, match=f"SamplingParams.{name}: .* is unsupported"):
        SamplingParams(**{name: VLLM_SAMPLING_UNSUPPORTED[name]})


def test_cumulative_logprob_decoded_token_and_prompt_types(smol_tokenizer_model):
    llm = LLM(smol_tokenizer_model, device="cpu")
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello my name is")
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=1)
    outs = llm.generate([TextPrompt(prompt="Hello my name is"), InputsTokensPrompt(prompt_token_ids=ids),
                         "Hello my name is"], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[1:]] == [outs[0].outputs[0].token_ids] * 2
    c = outs[0].outputs[0]
    assert math.isclose(c.cumulative_logprob, sum(float(d[t]) for d, t in zip(c.logprobs, c.token_ids)),
                        rel_tol=1e-9) and c.cumulative_logprob < 0
    for d in c.logprobs:
        assert len(d) >= 3 and all(lp.decoded_token == tok.convert_tokens_to_string(tok.convert_ids_to_tokens([t]))
                                   for t, lp in d.items())
    assert "".join(d[t].decoded_token for d, t in zip(c.logprobs, c.token_ids)) == c.text
    assert all(d[t].decoded_token is not None for d, t in zip(outs[0].prompt_logprobs[1:], ids[1:]))
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].cumulative_logprob is None


def test_truncate_prompt_tokens_and_priority(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=2, temperature=0, truncate_prompt_tokens=2),
                       use_tqdm=False, priority=[3])[0]
    ref = llm.generate([[8, 9]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
    assert (out.prompt_token_ids, out.outputs[0].token_ids) == ([8, 9], ref.outputs[0].token_ids)
    with pytest.raises(RequestError, match="priority: expected a list with one int per prompt"):
        llm.generate([[5]], priority=[1, 2])


def test_generate_shows_progress_by_default(tiny_llama, capsys):
    llm = LLM(tiny_llama, device="cpu")
    llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2))
    assert "Processed prompts: 100%" in capsys.readouterr().err
    llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_cli_generate_shows_progress_for_several_prompts(smol_tokenizer_model, capsys):
    from weavelm.cli import main

    base = ["generate", "--model", smol_tokenizer_model, "--device", "cpu", "--max-tokens", "2"]
    assert main(base + ["--prompt", "a", "--prompt", "b"]) == 0
    assert "Processed prompts: 100%|██████████| 2/2" in capsys.readouterr().err
    assert main(base + ["--prompt", "a"]) == 0
    assert "Processed prompts" not in capsys.readouterr().err


def test_async_llm_outputs_carry_cumulative_logprob(tiny_llama):
    import asyncio

    from weavelm import AsyncLLM

    sp = SamplingParams(max_tokens=3, logprobs=1, n=2, seed=3, ignore_eos=True)  # both finish on one step
    ref = LLM(tiny_llama, device="cpu").generate([[5, 6]], sp, use_tqdm=False)[0]
    engine = AsyncLLM(model=tiny_llama, device="cpu")

    async def last(delta: bool):
        out = None
        async for out in engine.generate({"prompt_token_ids": [5, 6]}, sp, f"r-{delta}", delta=delta):
            pass
        return out

    try:
        for delta in (False, True):
            out = asyncio.run(last(delta))
            assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(
                [c.cumulative_logprob for c in ref.outputs], rel=1e-6)
    finally:
        engine.shutdown()
