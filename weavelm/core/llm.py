"""LLM, the offline API (vLLM's shape): builds a per-engine registry and config, then drives an LLMEngine."""

from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Iterator, Sequence
from typing import Any

from weavelm.chat_template import render_chat
from weavelm.core.compat import apply_vllm_aliases
from weavelm.core.config import EngineConfig, merge_overrides, read_yaml
from weavelm.core.chat_media import ChatMedia, flatten_chat_media, has_media
from weavelm.core.input_processor import PromptType, _is_token_id
from weavelm.core.llm_engine import EngineStats, LLMEngine
from weavelm.core.output_processor import Outbox
from weavelm.core.outputs import CompletionOutput, RequestOutput
from weavelm.core.registry import Registry
from weavelm.core.request import SamplingParams, show_value
from weavelm.errors import RequestError
from weavelm.pooling.offline import PoolingMethods

logger = logging.getLogger("weavelm.llm")


def _prompt_list(prompts: Any) -> list:
    """`generate`'s prompts as a list: one prompt (str, dict or a token-id list) or a list/tuple of prompts."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and _is_token_id(prompts[0])):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise RequestError(f"prompts: expected a prompt or a list of prompts (got {type(prompts).__name__})")
    return list(prompts)


def build_engine_config(model: str | None, config: str | EngineConfig | dict | None, sets: list[str] | None,
                        registry: Registry | None, overrides: dict[str, Any]) -> tuple[EngineConfig, Registry]:
    """The EngineConfig and per-engine registry from `LLM(...)`'s (and `AsyncLLM(...)`'s) arguments."""
    registry = registry or Registry.load()  # one registry per engine: its plugins, its allow-list
    if isinstance(config, EngineConfig) and not (overrides or model or sets):
        return config, registry
    raw = config.to_dict() if isinstance(config, EngineConfig) else (
        read_yaml(config) if isinstance(config, str) else dict(config or {}))
    # vLLM's flat arguments (max_num_seqs=..., tensor_parallel_size=...) land in their sections
    overrides = apply_vllm_aliases({"model": model, **overrides}, registry, base=raw)
    return EngineConfig.build(merge_overrides(raw, overrides, sets), registry), registry


class LLM(PoolingMethods):
    """Offline inference, vLLM-style. `LLM(model=..., **overrides)` or `LLM(config="engine.yaml")`.
    `LLM(model, runner="pooling")` embeds instead (`embed`, `encode`, `score`: `weavelm.pooling.offline`)."""

    def __init__(self, model: str | None = None, *, config: str | EngineConfig | dict | None = None,
                 sets: list[str] | None = None, registry: Registry | None = None, core_attachment: Any = None,
                 **overrides: Any):
        engine_config, registry = build_engine_config(model, config, sets, registry, overrides)
        self.config = engine_config
        self._closed = False
        self.engine = LLMEngine(engine_config, registry, core_attachment)

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for `engine`."""
        return self.engine

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Call `method` on every worker (vLLM's `LLM.collective_rpc`); results in rank order. For tools and tests:
        e.g. `llm.collective_rpc("set_logits_hook", (hook,))`. Call it between requests."""
        return self.engine.collective_rpc(method, args, kwargs, ranks)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def add_lora(self, lora_request: Any) -> bool:
        """Add a LoRA adapter at run time (vLLM's `add_lora`): it is read and checked now (LoRAError naming the
        problem), then selectable by name (`lora_request="name"`). False when this very adapter is added already;
        a name or id taken by another adapter is a LoRAError. Needs LoRA enabled (`enable_lora=True`)."""
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora: int | str) -> bool:
        """Remove an adapter by id (vLLM's `remove_lora`) or name; False when none has it. Requests running on it
        finish; new requests on it are refused until it is added again."""
        return self.engine.remove_lora(lora)

    def list_loras(self) -> set[int]:
        """The ids of the adapters selectable by name (vLLM's `list_loras`)."""
        return self.engine.list_loras()

    def get_stats(self) -> EngineStats:
        """Running / waiting requests, KV blocks used and total, KV usage and prefix-cache hit rate."""
        return self.engine.get_stats()

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests by id (unknown or finished ids are ignored); their consumers get a final output with
        finish_reason "abort" and their KV blocks are freed."""
        self.engine.abort_request(request_ids)

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's defaults from its generation_config.json (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens -> max_tokens), else SamplingParams(); what `generate`, `stream` and
        `chat` use when given no sampling_params (vLLM's behaviour)."""
        return self.engine.get_default_sampling_params()

    def _params_list(self, n: int, params: SamplingParams | Sequence[SamplingParams] | None) -> list:
        if params is None or isinstance(params, SamplingParams):
            return [params or self.get_default_sampling_params()] * n
        if not isinstance(params, (list, tuple)):
            raise RequestError(f"sampling_params: expected SamplingParams or a list of them "
                               f"(got {type(params).__name__})")
        if len(params) != n:
            raise RequestError(f"sampling_params: {len(params)} given for {n} prompts; give one or one per prompt")
        return list(params)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: Any = True, lora_request: Any = None, priority: list[int] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion, each on `lora_request` (one `LoRARequest` for all, or a list with one per
        prompt; None means the base model), with a tqdm bar on stderr (vLLM's default; `use_tqdm=False` hides it).
        `priority` (vLLM's): one per prompt, overriding their SamplingParams' priority. Every request is validated
        before any is queued; an invalid one (or one the engine can never schedule) yields an output with `error`
        set and finish_reason "error", and the other prompts run normally. Safe to call from several threads and
        while streams are open."""
        self._check_generate()
        return self._run_requests(prompts, sampling_params, use_tqdm, lora_request, "gen", priority)

    def _check_generate(self) -> None:
        if self.config.runner == "pooling":
            raise RequestError("this engine runs runner='pooling', which embeds prompts and generates nothing; use "
                               "llm.embed(prompts), or an engine with runner='generate' to generate")

    def _run_requests(self, prompts: Any, sampling_params: Any, use_tqdm: Any, lora_request: Any,
                      prefix: str, priority: list[int] | None = None) -> list[RequestOutput]:
        """`generate`'s body, shared with the pooling methods: every prompt to its final output, in order."""
        prompts = _prompt_list(prompts)
        params = self._params_list(len(prompts), sampling_params)
        if priority is not None:
            params = _with_priority(params, priority)
        loras = _lora_list(len(prompts), lora_request)
        base = self.engine.new_request_id()
        order = [f"{prefix}-{base}-{i}" for i in range(len(prompts))]
        results: dict[str, RequestOutput] = {}
        prepared = []
        for rid, p, sp, lora in zip(order, prompts, params, loras):
            try:
                prepared.append((rid, p, self.engine.prepare(p, sp), lora))
            except RequestError as e:
                results[rid] = error_output(p, e, rid)
        outbox = Outbox(finished_only=True)
        pending: set[str] = set()
        try:
            for rid, p, req, lora in prepared:
                try:
                    pending.add(self.engine.submit(req, rid, outbox=outbox, lora_request=lora))
                except RequestError as e:
                    results[rid] = error_output(p, e, rid)
            self._run_until_done(pending, outbox, results, use_tqdm)
        finally:
            if pending:  # an exception (or KeyboardInterrupt) left requests behind
                self.engine.abort_request(list(pending), discard=True)
        return [results[r] for r in order]

    def _run_until_done(self, pending: set[str], outbox: Outbox, results: dict[str, RequestOutput],
                        use_tqdm: bool) -> None:
        bar = _progress(len(pending), use_tqdm)
        while pending:
            for out in self.engine.collect(outbox):
                results[out.request_id] = out
                pending.discard(out.request_id)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
               lora_request: Any = None) -> Iterator[RequestOutput]:
        """Yield a growing RequestOutput after every step that adds text, ending with the finished one. Closing
        the generator early (break, close(), garbage collection) aborts the request. Safe to interleave with
        other streams, `generate` calls and threads."""
        self._check_generate()
        outbox = Outbox(finished_only=False)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        rid = self.engine.add_request(prompt, params, outbox=outbox, lora_request=lora_request)
        finished = False
        try:
            while not finished:
                for out in self.engine.collect(outbox):
                    finished = out.finished
                    yield out
        finally:
            if not finished:
                self.engine.abort_request(rid, discard=True)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request: Any = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None
             ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered with the tokenizer's chat template and generated as one batch. Always returns a list of
        RequestOutput, one per conversation (as vLLM does)."""
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise RequestError(f"chat_template_content_format: {chat_template_content_format!r} is unsupported; "
                               f"use 'auto'")
        conversations = _conversations(messages)
        tok = self.get_tokenizer()
        params = self._params_list(len(conversations), sampling_params)
        loras = _lora_list(len(conversations), lora_request)
        prompts, failed = [], {}
        for i, conv in enumerate(conversations):
            try:  # image_url parts: decoded here; a bad one fails its conversation only
                media = flatten_chat_media(conv, self.engine.processor.image_placeholder, self.config.multimodal) \
                    if has_media(conv) else ChatMedia(conv)
            except RequestError as e:
                failed[i] = e
                continue
            prompts.append(media.add_to(render_chat(
                tok, media.conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs)))
        if not failed:
            return self.generate(prompts, params, use_tqdm, loras)
        keep = [i for i in range(len(conversations)) if i not in failed]
        outs = iter(self.generate(prompts, [params[i] for i in keep], use_tqdm, [loras[i] for i in keep])
                    if keep else [])
        return [error_output({}, failed[i], f"chat-{i}") if i in failed else next(outs)
                for i in range(len(conversations))]

    def shutdown(self) -> None:
        """Stop the engine: its core process and workers, if any. Idempotent; the LLM cannot be used after."""
        if not self._closed:
            self._closed = True
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


def error_output(prompt: Any, err: Exception, request_id: str) -> RequestOutput:
    """The finished output of a request rejected before it was queued (what can be shown of its prompt)."""
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    text = text if isinstance(text, str) else None
    ids = prompt.get("prompt_token_ids", []) if isinstance(prompt, dict) else []
    ids = ids if isinstance(ids, list) and all(_is_token_id(t) for t in ids) else []
    return RequestOutput(request_id, text, [int(t) for t in ids], [CompletionOutput(0, "", [], "error")], True,
                         error=str(err))


def _with_priority(params: list[SamplingParams], priority: Any) -> list[SamplingParams]:
    if not isinstance(priority, (list, tuple)) or len(priority) != len(params):
        raise RequestError(f"priority: expected a list with one int per prompt ({len(params)}) (got "
                           f"{show_value(priority)})")
    return [replace(sp, priority=p) for sp, p in zip(params, priority)]


def _lora_list(n: int, lora_request: Any) -> list:
    """`generate`'s lora_request as one entry per prompt (a single request or None applies to all)."""
    if not isinstance(lora_request, (list, tuple)):
        return [lora_request] * n
    if len(lora_request) != n:
        raise RequestError(f"lora_request: {len(lora_request)} given for {n} prompts; give one or one per prompt")
    return list(lora_request)


def _conversations(messages: Any) -> list[list[dict[str, Any]]]:
    """`chat`'s input as a list of conversations; RequestError naming the expected shape otherwise."""
    rule = ("messages: expected a conversation (a list of {'role': ..., 'content': ...} dicts) or a list of "
            "conversations")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError(f"{rule} (got {show_value(messages)})")
    convs = [messages] if isinstance(messages[0], dict) else list(messages)
    for conv in convs:
        if not isinstance(conv, (list, tuple)) or not conv or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in conv):
            raise RequestError(f"{rule} (got {show_value(conv)})")
    return [list(c) for c in convs]


def _progress(total: int, enabled: Any):
    """The progress bar of `generate` (vLLM's `use_tqdm`: True, False, or a tqdm-like class to build it with)."""
    if not enabled:
        return None
    from tqdm import tqdm
    factory = enabled if callable(enabled) else tqdm
    return factory(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
