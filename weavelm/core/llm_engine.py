"""The frontend: LLMEngine (validate, tokenize, detokenize incrementally) and LLM, the offline API."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from weavelm.core.client import EngineCoreClient, InprocClient
from weavelm.core.config import EngineConfig, merge_overrides, read_yaml
from weavelm.core.detokenizer import IncrementalDetokenizer, add_tokens_batch
from weavelm.core.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from weavelm.core.registry import get_registry
from weavelm.core.request import Request, SamplingParams
from weavelm.errors import RequestError

logger = logging.getLogger("weavelm.llm")
PromptType = str | dict[str, Any] | list[int]


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int]
    logprobs: list[float] | None
    arrival: float
    first_token_time: float | None = None
    num_cached_tokens: int = 0


class LLMEngine:
    """Turns prompts into core requests and core deltas into RequestOutputs."""

    def __init__(self, config: EngineConfig):
        if config.model is None:
            from weavelm.default_model import default_model_path
            config.model = default_model_path()
        self.config = config
        registry = get_registry()
        loader = registry.get("loader", config.loader.name)(config.loader.options)
        self.hf_config = loader.load_hf_config(config.model)
        self.tokenizer = self._load_tokenizer(loader)
        self.client: EngineCoreClient = InprocClient(config)
        self.max_model_len = self.client.max_model_len
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_id, self.extra_eos = self._eos_ids()
        self.states: dict[str, _RequestState] = {}
        self._counter = itertools.count()
        self.hook = registry.hook

    def _load_tokenizer(self, loader) -> Any:
        from transformers import AutoTokenizer

        if not self.config.tokenizer:  # an explicit tokenizer wins over the one the weights carry
            tok = loader.load_tokenizer(self.config.model)
            if tok is not None:
                return tok
        path = self.config.tokenizer or self.config.model
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # no tokenizer files: token-id prompts only
            if self.config.tokenizer:
                raise RequestError(f"tokenizer: cannot load a tokenizer from {path!r} ({e})") from e
            logger.info("no tokenizer beside %s; only token-id prompts are accepted", path)
            return None
        vocab = getattr(self.hf_config, "vocab_size", 0) or 0
        if not self.config.tokenizer and len(tok) < vocab // 2:
            # some transformers versions build an empty tokenizer from a config-only folder
            logger.warning("ignoring the tokenizer found for %s: %d tokens for a %d-token model; only token-id "
                           "prompts are accepted", path, len(tok), vocab)
            return None
        return tok

    def _eos_ids(self) -> tuple[int | None, list[int]]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            return (eos[0] if eos else None), list(eos[1:])
        return eos, []

    # -- requests -----------------------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("prompt: a dict prompt needs `prompt` or `prompt_token_ids`")
        if isinstance(prompt, list):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise RequestError(f"prompt: must be a str, a token-id list or a dict (got {type(prompt).__name__})")
        if self.tokenizer is None:
            raise RequestError("prompt: this model has no tokenizer; pass {'prompt_token_ids': [...]} instead")
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling_params: expected SamplingParams (got {type(params).__name__})")
        if not token_ids:
            raise RequestError("prompt: is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"prompt: has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                               f"(one position must stay free for output); shorten the prompt or raise "
                               f"max_model_len")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt_token_ids: {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises RequestError (nothing is queued) when it is invalid."""
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self.validate(ids, params)
        rid = request_id or str(next(self._counter))
        if rid in self.states:
            raise RequestError(f"request_id: {rid!r} is already in use")
        if self.extra_eos and not params.ignore_eos:
            params = SamplingParams(**{**params.__dict__, "stop_token_ids": params.stop_token_ids + self.extra_eos})
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output)
        self.states[rid] = _RequestState(rid, text, ids, params, detok, [], [] if params.logprobs else None,
                                         time.perf_counter())
        self.client.add_request(Request(rid, ids, params, eos_token_id=self.eos_token_id))
        return rid

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        outs = self.client.abort_requests(request_ids)
        return [o for o in (self._process(c) for c in outs) if o is not None]

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def step(self, finished_only: bool = False, delta: bool = False) -> list[RequestOutput]:
        """Run one core step. Returns a RequestOutput per request that changed; with `finished_only` only for
        requests that finished; with `delta` each output's token_ids (and logprobs) hold only this step's new
        tokens (text stays cumulative). Both avoid per-step copies of growing outputs."""
        core_outs = [co for co in self.client.get_output() if co.request_id in self.states]
        hits = add_tokens_batch([(self.states[co.request_id].detok, co.new_token_ids) for co in core_outs])
        outs = []
        for co, hit in zip(core_outs, hits):
            ro = self._process(co, finished_only, delta, hit)
            if ro is not None:
                outs.append(ro)
        return outs

    def _process(self, co: EngineCoreOutput, finished_only: bool = False, delta: bool = False,
                 hit: str | None | object = ...) -> RequestOutput | None:
        """Fold one core delta into the request's state; `hit` is the stop string found by a batched
        detokenization of this delta (`...`: detokenize here)."""
        st = self.states.get(co.request_id)
        if st is None:
            return None
        now = time.perf_counter()
        if co.new_token_ids and st.first_token_time is None:
            st.first_token_time = now
        st.token_ids.extend(co.new_token_ids)
        st.num_cached_tokens = co.num_cached_tokens
        if st.logprobs is not None and co.new_logprobs:
            st.logprobs.extend(co.new_logprobs)
        finish_reason, stop_reason = co.finish_reason, co.stop_reason
        if hit is ...:
            hit = st.detok.add_tokens(co.new_token_ids)
        if hit is not None and finish_reason is None:
            self.client.abort_requests([co.request_id])
            finish_reason, stop_reason = "stop", hit
        if finished_only and finish_reason is None:
            return None
        out = RequestOutput(
            request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
            outputs=[CompletionOutput(
                0, st.detok.text, list(co.new_token_ids) if delta else list(st.token_ids), finish_reason,
                stop_reason, (list(co.new_logprobs or []) if delta else list(st.logprobs))
                if st.logprobs is not None else None)],
            finished=finish_reason is not None, num_cached_tokens=st.num_cached_tokens,
            error=co.error,
            metrics={"arrival": st.arrival, "first_token": st.first_token_time or 0.0, "now": now})
        if out.finished:
            del self.states[co.request_id]
            self.hook.weavelm_request_finished(output=out)
        return out

    def shutdown(self) -> None:
        self.client.shutdown()


def error_output(prompt: PromptType, err: Exception, request_id: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else None
    ids = prompt.get("prompt_token_ids", []) if isinstance(prompt, dict) else []
    return RequestOutput(request_id, text, list(ids) if isinstance(ids, list) else [],
                         [CompletionOutput(0, "", [], "error")], True, error=str(err))


class LLM:
    """Offline inference, vLLM-style. `LLM(model=..., **overrides)` or `LLM(config="engine.yaml")`."""

    def __init__(self, model: str | None = None, *, config: str | EngineConfig | dict | None = None,
                 sets: list[str] | None = None, **overrides: Any):
        if isinstance(config, EngineConfig):
            engine_config = config if not (overrides or model) else EngineConfig.build(
                merge_overrides(config.to_dict(), {"model": model, **overrides}, sets))
        else:
            raw = read_yaml(config) if isinstance(config, str) else dict(config or {})
            engine_config = EngineConfig.build(merge_overrides(raw, {"model": model, **overrides}, sets))
        self.config = engine_config
        self.engine = LLMEngine(engine_config)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _params_list(self, n: int, params: SamplingParams | Sequence[SamplingParams] | None):
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        params = list(params)
        if len(params) != n:
            raise RequestError(f"sampling_params: {len(params)} given for {n} prompts; give one or one per prompt")
        return params

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion. An invalid prompt yields an output with `error` set and
        finish_reason "error"; the other prompts run normally."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(len(prompts), sampling_params)
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        base = next(self.engine._counter)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            rid = f"gen-{base}-{i}"
            order.append(rid)
            try:
                self.engine.add_request(p, sp, request_id=rid)
            except RequestError as e:
                logger.warning("request %s rejected: %s", rid, e)
                results[rid] = error_output(p, e, rid)
        bar = _progress(len(prompts) - len(results), use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(finished_only=True):
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[r] for r in order]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a growing RequestOutput after every step that adds text, ending with the finished one."""
        rid = self.engine.add_request(prompt, sampling_params)
        done = False
        while not done:
            for out in self.engine.step():
                if out.request_id == rid:
                    done = out.finished
                    yield out

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        tok = self.get_tokenizer()
        if tok is None or not getattr(tok, "chat_template", None):
            raise RequestError("chat: this model's tokenizer has no chat template")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        return self.generate([{"prompt": text, "prompt_token_ids": ids}], sampling_params)[0]

    def shutdown(self) -> None:
        self.engine.shutdown()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="req")
