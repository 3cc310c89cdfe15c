"""vLLM's `LLM(...)` / `EngineArgs` arguments that weavelm has no section for: each is accepted at vLLM's default
value (so ported code runs unchanged) and refused with a message saying it is unsupported at any other value.

The arguments weavelm implements are mapped elsewhere: the flat aliases and special cases in `weavelm.core.compat`
(`max_num_seqs`, `load_format`, `scheduling_policy`, `quantization`, ...) and the top-level config fields (`model`,
`dtype`, `seed`, `max_model_len`, ...).
"""

from __future__ import annotations

from typing import Any

from weavelm.core.config import echo

_LOCAL = "weavelm loads local folders and files only (no hub downloads)"
_NO_MM = "weavelm has no such multimodal option (see the `multimodal:` config section)"
_NO_POOL = "weavelm has no such feature"

# vLLM name -> (the values accepted silently: vLLM's defaults, or values meaning what weavelm always does; why any
# other value is unsupported)
DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "tokenizer_mode": (("auto", "hf"), "weavelm loads Hugging Face tokenizers (tokenizer_mode 'auto')"),
    "skip_tokenizer_init": ((False,), "weavelm detokenizes every output and needs the tokenizer"),
    "allowed_media_domains": ((None,), _NO_MM),
    "revision": ((None,), _LOCAL),
    "tokenizer_revision": ((None,), _LOCAL),
    "code_revision": ((None,), _LOCAL),
    "hf_token": ((None,), _LOCAL),
    "download_dir": ((None,), _LOCAL),
    "hf_config_path": ((None,), _LOCAL),
    "config_format": (("auto", "hf"), "weavelm reads Hugging Face config.json (or GGUF metadata)"),
    "hf_overrides": ((None,), "weavelm reads the model's config.json as it is"),
    "rope_scaling": ((None,), "set rope scaling in the model's config.json"),
    "rope_theta": ((None,), "set rope_theta in the model's config.json"),
    "cpu_offload_gb": ((0,), "weavelm keeps all weights on the device"),
    "kv_cache_memory_bytes": ((None,), "size the KV cache with gpu_memory_utilization or num_gpu_blocks_override"),
    "max_seq_len_to_capture": ((8192,), "weavelm picks its CUDA-graph sizes itself (enforce_eager disables them)"),
    "cuda_graph_sizes": ((None,), "weavelm picks its CUDA-graph sizes itself (enforce_eager disables them)"),
    "compilation_config": ((None,), "weavelm does not use torch.compile"),
    "disable_custom_all_reduce": ((False, True), ""),  # weavelm always all-reduces through NCCL
    "disable_async_output_proc": ((False,), "weavelm always processes outputs off the step"),
    "mm_processor_kwargs": ((None,), _NO_MM),
    "mm_processor_cache_gb": ((4, 4.0), _NO_MM),
    "enable_multimodal_encoder_data_parallel": ((False,), _NO_MM),
    "logits_processors": ((None,), "per-engine logits processors are not supported; use logit_bias, bad_words "
                                   "or structured outputs"),
    "kv_cache_dtype": (("auto",), "weavelm stores the KV cache in the model's dtype"),
    "calculate_kv_scales": ((False,), "weavelm stores the KV cache in the model's dtype"),
    "max_logprobs": ((20,), "weavelm's limit is 20 logprobs per token"),
    "logprobs_mode": (("raw_logprobs",), "weavelm returns the model's raw log-probabilities"),
    "data_parallel_size": ((1,), "weavelm runs one engine per process; start one server per replica"),
    "enable_expert_parallel": ((False,), "weavelm shards experts with tensor parallelism"),
    "lora_dtype": (("auto", None), "adapters run in the model's dtype"),
    "fully_sharded_loras": ((False,), "weavelm shards LoRA with tensor parallelism its own way"),
    "lora_extra_vocab_size": ((256, 0), "weavelm's LoRA adapters do not extend the vocabulary"),
    "max_num_partial_prefills": ((1,), "weavelm prefills with long_prefill_token_threshold"),
    "max_long_partial_prefills": ((1,), "weavelm prefills with long_prefill_token_threshold"),
    "preemption_mode": ((None, "recompute"), "weavelm recomputes preempted requests"),
    "num_lookahead_slots": ((0,), "speculative decoding sizes its own slots"),
    "generation_config": (("auto",), "weavelm reads the model's generation_config.json for default sampling "
                                     "parameters"),
    "override_generation_config": ((None,), "pass SamplingParams explicitly instead"),
    "enable_sleep_mode": ((False,), _NO_POOL),
    "disable_sliding_window": ((False,), _NO_POOL),
    "disable_cascade_attn": ((False,), "weavelm has no cascade attention"),
    "enable_prompt_embeds": ((False,), "prompts are text or token ids"),
    "worker_cls": (("auto",), "pick the worker with the `worker:` section"),
    "worker_extension_cls": (("",), "write a worker plugin instead"),
    "scheduler_cls": (("vllm.core.scheduler.Scheduler", "vllm.v1.core.sched.scheduler.Scheduler", None),
                      "pick the scheduler with the `scheduler:` section or scheduling_policy"),
    "kv_transfer_config": ((None,), "disaggregated prefill is not supported"),
    "kv_events_config": ((None,), "KV-cache events are not supported"),
    "model_impl": (("auto",), "weavelm runs its own model plugins"),
    "guided_decoding_backend": (("auto",), "weavelm picks its structured-output backend"),
    "reasoning_parser": (("", None), "pass --reasoning-parser to `weavelm serve`"),
    "max_parallel_loading_workers": ((None,), _NO_POOL),
    "ignore_patterns": ((None,), _NO_POOL),
    "otlp_traces_endpoint": ((None,), "tracing is not supported"),
    "collect_detailed_traces": ((None,), "tracing is not supported"),
    "enable_log_requests": ((False,), "`weavelm serve` logs each finished request"),
    "disable_log_requests": ((True, False), ""),  # weavelm logs one line per finished request either way
    "served_model_name": ((None,), "pass --served-model-name to `weavelm serve`"),
    "kv_sharing_fast_prefill": ((False,), _NO_POOL),
    "use_tqdm_on_load": ((True, False), ""),  # a display choice
}


def take_default_only(raw: dict[str, Any], errors: list[tuple[str, str]]) -> None:
    """Pop every `DEFAULT_ONLY` argument from `raw`; one at a value other than its accepted ones adds an error
    saying it is unsupported and why."""
    for name, (accepted, why) in DEFAULT_ONLY.items():
        if name not in raw:
            continue
        value = raw.pop(name)
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            shown = " or ".join(echo(a) for a in accepted)
            errors.append((name, f"{echo(value)} is unsupported: {why}; leave it out or at {shown}"))


def _json(text: str) -> Any:
    import json
    return json.loads(text)


_INT, _FLOAT, _STR, _BOOL, _JSON = int, float, str, bool, _json
# Every vLLM engine argument `EngineArgs.add_cli_args` adds, with its flag's type.
CLI_TYPES: dict[str, Any] = {
    "model": _STR, "tokenizer": _STR, "dtype": _STR, "seed": _INT, "max_model_len": _INT, "enforce_eager": _BOOL,
    "async_scheduling": _BOOL, "trust_remote_code": _BOOL, "tensor_parallel_size": _INT,
    "pipeline_parallel_size": _INT, "distributed_executor_backend": _STR, "gpu_memory_utilization": _FLOAT,
    "block_size": _INT, "enable_prefix_caching": _BOOL, "num_gpu_blocks_override": _INT, "max_num_seqs": _INT,
    "max_num_batched_tokens": _INT, "enable_chunked_prefill": _BOOL, "long_prefill_token_threshold": _INT,
    "enable_lora": _BOOL, "max_loras": _INT, "max_lora_rank": _INT, "max_cpu_loras": _INT,
    "speculative_config": _JSON, "load_format": _STR, "scheduling_policy": _STR, "quantization": _STR,
    "swap_space": _FLOAT, "disable_log_stats": _BOOL,
    **{name: (_BOOL if isinstance(a[0], bool) else _JSON if a[0] is None or isinstance(a[0], dict)
              else type(a[0])) for name, (a, _) in DEFAULT_ONLY.items()},
}


class EngineArgs:
    """vLLM's `EngineArgs`, for scripts that build `LLM(**vars(parser.parse_args()))`: `add_cli_args` adds one
    `--flag` per vLLM engine argument, each defaulting to None (left out), so only the flags given reach `LLM`.
    `EngineArgs(model=..., **kwargs)` holds keyword arguments for `LLM(**vars(engine_args))`."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.model = model
        self.__dict__.update(kwargs)

    @staticmethod
    def add_cli_args(parser: Any) -> Any:
        import argparse

        group = parser.add_argument_group("engine arguments (vLLM's)")
        for name, kind in CLI_TYPES.items():
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction)
            else:
                group.add_argument(flag, dest=name, default=None, type=kind)
        return parser

    @classmethod
    def from_cli_args(cls, args: Any) -> EngineArgs:
        return cls(**{name: getattr(args, name) for name in CLI_TYPES if getattr(args, name, None) is not None})
