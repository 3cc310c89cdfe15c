"""InputProcessor: turns a prompt and its SamplingParams into a validated core request (tokenize, check against the
model's context and vocabulary, fill the engine-set sampling fields). `LLMEngine` and `AsyncLLM` each own one."""

from __future__ import annotations

import logging
import numbers
from dataclasses import replace
from typing import Any, NamedTuple

from weavelm.core.assembly import build_loader
from weavelm.core.config import EngineConfig
from weavelm.core.generation_defaults import default_sampling_params
from weavelm.core.model_files import resolve_model
from weavelm.core.multimodal import text_config_of
from weavelm.core.registry import Registry
from weavelm.core.request import SamplingParams, show_value
from weavelm.errors import MultiModalInputError, RequestError

logger = logging.getLogger("weavelm.llm")
PromptType = str | dict[str, Any] | list[int]


class Prepared(NamedTuple):
    """A validated request: prompt text (or None), prompt token ids (placeholders expanded), params, and its
    multimodal items (None: text only)."""

    text: str | None
    token_ids: list[int]
    params: SamplingParams
    mm_features: list | None = None


class InputProcessor:
    """The model's tokenizer, config and limits, and the checks every request passes before it reaches the core.
    `max_model_len` is set by the owner once the core has sized its KV cache."""

    def __init__(self, config: EngineConfig, registry: Registry):
        config.model = resolve_model(config.model)
        self.config = config
        self.loader = build_loader(config, registry)  # handed on to an in-process core: one per engine
        self.hf_config = self.loader.load_hf_config(config.model)
        self.tokenizer = self._load_tokenizer(self.loader)
        self.vocab_size: int = text_config_of(self.hf_config).vocab_size
        self.eos_token_id, self.extra_eos = self._eos_ids()
        self.max_model_len = 0  # set by set_max_model_len once the core is up
        self._model_max_len = 0
        self._grammars = None  # structured outputs' GrammarCompiler, built on the first constrained request
        self.mm = self._multimodal_processor(registry)  # MultiModalProcessor, or None for a text-only model

    def _multimodal_processor(self, registry: Registry) -> Any:
        from weavelm.core.multimodal import supports_multimodal

        archs = getattr(self.hf_config, "architectures", None)
        if not isinstance(archs, (list, tuple)) or not archs or not isinstance(archs[0], str):
            return None
        try:
            model_cls = registry.find_model(archs[0])
        except Exception:  # the runner reports an unsupported architecture
            return None
        if not supports_multimodal(model_cls):
            return None
        from weavelm.core.mm_processor import MultiModalProcessor

        return MultiModalProcessor(self.config.model, self.hf_config, model_cls, self.config.multimodal)

    @property
    def image_placeholder(self) -> str | None:
        """The text that marks an image's place in a prompt (LLaVA: "<image>"); None for a text-only model."""
        return self.mm.placeholder_str() if self.mm is not None else None

    def set_max_model_len(self, max_model_len: int, model_info: dict[str, Any]) -> None:
        """The context limit the core runs with: the model's (or the configured) one, or less when the KV cache
        cannot hold it."""
        self.max_model_len = max_model_len
        self._model_max_len = int(model_info.get("max_model_len", max_model_len))

    def _load_tokenizer(self, loader) -> Any:
        from transformers import AutoTokenizer

        if not self.config.tokenizer:  # an explicit tokenizer wins over the one the weights carry
            tok = loader.load_tokenizer(self.config.model)
            if tok is not None:
                return tok
        path = self.config.tokenizer or self.config.model
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
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

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt's text (None for token ids) and token ids. A str is text; a list or tuple holds token ids; a
        dict has `prompt` (text) and/or `prompt_token_ids` (which wins). Raises RequestError on any other shape."""
        if isinstance(prompt, dict):
            unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}))
            if unknown:
                raise RequestError(f"prompt: unknown key(s) {unknown}; a dict prompt takes `prompt` and/or "
                                   f"`prompt_token_ids`, and `multi_modal_data`")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise RequestError(f"prompt: must be a str (got {type(text).__name__})")
            if "prompt_token_ids" in prompt:
                return text, _token_id_list(prompt["prompt_token_ids"])
            if text is None:
                raise RequestError("prompt: a dict prompt needs `prompt` or `prompt_token_ids`")
            prompt = text
        if isinstance(prompt, (list, tuple)):
            return None, _token_id_list(prompt)
        if not isinstance(prompt, str):
            raise RequestError(f"prompt: must be a str, a token-id list or a dict (got {type(prompt).__name__})")
        if self.tokenizer is None:
            raise RequestError("prompt: this model has no tokenizer; pass {'prompt_token_ids': [...]} instead")
        try:
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        except Exception as e:  # e.g. lone surrogates
            raise RequestError(f"prompt: the tokenizer cannot encode it ({type(e).__name__}: {e})") from e

    def validate(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a tokenized request; returns a re-validated copy of `params` (the caller may have changed
        fields after construction), which is what the engine runs."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling_params: expected SamplingParams (got {type(params).__name__})")
        params = replace(params)
        if not token_ids:
            raise RequestError("prompt: is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"prompt: has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                               f"(one position must stay free for output); shorten the prompt or "
                               f"{self._raise_limit_hint()}")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt_token_ids: {show_value(bad[:5])} outside the vocabulary "
                               f"[0, {self.vocab_size})")
        if self.config.runner == "pooling":
            params.max_tokens = 1  # a pooling request runs its prompt only (its one "token" is the embedding)
        if self.extra_eos and not params.ignore_eos:
            params.stop_token_ids = params.stop_token_ids + self.extra_eos
        self._validate_extras(params)
        return params

    def _raise_limit_hint(self) -> str:
        if self._model_max_len > self.max_model_len:
            return (f"grow the KV cache, which caps max_model_len below the model's {self._model_max_len} "
                    f"(cache.num_blocks, cache.cpu_kv_cache_gib or cache.gpu_memory_utilization)")
        return "raise max_model_len"

    def _validate_extras(self, params: SamplingParams) -> None:
        """Check the vocabulary-dependent fields and fill the engine-set ones (min_tokens' stop ids, bad words'
        token sequences)."""
        vocab = self.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise RequestError(f"SamplingParams.logit_bias: token id(s) {show_value(bad[:5])} outside the "
                               f"vocabulary [0, {vocab})")
        stop_ids = [] if params.ignore_eos or self.eos_token_id is None else [self.eos_token_id]
        params.min_tokens_stop_ids = [t for t in stop_ids + params.stop_token_ids if t < vocab] \
            if params.min_tokens else []
        params.bad_words_token_ids = self._bad_words_ids(params.bad_words) if params.bad_words else []
        if params.structured_outputs is not None:
            self._check_structured_outputs(params)

    def _check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's constraint (cached), so one that cannot compile fails here, naming it."""
        if self.tokenizer is None:
            raise RequestError("SamplingParams.structured_outputs: this model has no tokenizer to compile the "
                               "constraint against")
        if self._grammars is None:
            from weavelm.structured.backend import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self._grammars.compile(params.structured_outputs)

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word as given and with a leading space when that makes a
        different token sequence of the same length."""
        if self.tokenizer is None:
            raise RequestError("SamplingParams.bad_words: this model has no tokenizer to turn words into tokens")
        out: list[list[int]] = []
        for word in words:
            plain = list(self.tokenizer.encode(word, add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (plain, spaced) if spaced[:1] != plain[:1] and len(spaced) == len(plain) else (plain,):
                if ids and all(0 <= t < self.vocab_size for t in ids):
                    out.append(ids)
        return out

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's keys), else SamplingParams()."""
        if not hasattr(self, "_default_params"):
            self._default_params = default_sampling_params(self.config.model)
        return replace(self._default_params)

    def prepare(self, prompt: PromptType, params: SamplingParams | None = None) -> Prepared:
        """Tokenize and validate a whole request without queueing anything; raises RequestError."""
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        keep = getattr(params, "truncate_prompt_tokens", None)
        features = None
        if mm_data is not None:
            text, ids, features = self._process_multimodal(prompt, mm_data)
            if keep is not None and len(ids) > keep:
                raise RequestError("SamplingParams.truncate_prompt_tokens: cannot cut a prompt with images; "
                                   "shorten its text instead")
        else:
            text, ids = self.tokenize(prompt)
            if keep is not None and len(ids) > keep:  # vLLM's: keep the prompt's last `keep` tokens
                text, ids = None, ids[-keep:]
            if self.mm is not None and self.mm.placeholder_id in ids:
                raise MultiModalInputError(f"prompt: holds the image placeholder "
                                           f"{self.image_placeholder!r} but no image; pass the image in "
                                           f"multi_modal_data, or drop the placeholder")
        return Prepared(text, ids, self.validate(ids, SamplingParams() if params is None else params), features)

    def _process_multimodal(self, prompt: dict[str, Any], mm_data: Any) -> tuple[str | None, list[int], list]:
        unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}))
        text = prompt.get("prompt")
        if unknown or (text is not None and not isinstance(text, str)):
            raise RequestError(f"prompt: a dict prompt takes `prompt` (a str) and/or `prompt_token_ids`, and "
                               f"`multi_modal_data` (got keys {sorted(map(str, prompt))})")
        if text is None and "prompt_token_ids" not in prompt:
            raise RequestError("prompt: a dict prompt needs `prompt` or `prompt_token_ids`")
        if self.mm is None:
            archs = getattr(self.hf_config, "architectures", None)
            raise RequestError(f"multi_modal_data: this model ({archs}) takes no images; send a text prompt or "
                               f"serve a vision-language model")
        ids = _token_id_list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else None
        return self.mm.process(text, ids, mm_data)



def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_id_list(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_token_id(t) for t in value):
        raise RequestError(f"prompt_token_ids: must be a list of integer token ids (got {show_value(value)})")
    return [int(t) for t in value]
