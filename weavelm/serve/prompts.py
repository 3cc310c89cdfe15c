"""Prompts on their way into the engine, without stalling the event loop: size bounds checked before any
tokenizing, then tokenizing and chat-template rendering on one worker thread (as vLLM's server does: a fast
tokenizer releases the GIL, so /health and every stream keep going meanwhile)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from weavelm.chat_template import render_chat
from weavelm.errors import RequestError

CHARS_PER_TOKEN_BOUND = 32  # a text longer than this many characters per context position cannot fit
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_DETOKENIZE_CONTEXTS = 4


class PromptPreparer:
    """Turns API prompts into engine prompts (`{"prompt", "prompt_token_ids"}` dicts) for an engine whose context
    is `max_model_len` tokens. Every method raises RequestError naming the field and the limit."""

    def __init__(self, engine: Any, max_model_len: int):
        self.engine = engine  # the LLMEngine: its tokenizer and tokenize() rules
        self.max_model_len = max_model_len
        self.max_chars = CHARS_PER_TOKEN_BOUND * max_model_len
        # one thread: a Rust tokenizer is not safe for concurrent calls ("Already borrowed")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weavelm-tokenize")

    def check_text(self, text: str, field: str = "prompt") -> None:
        if len(text) > self.max_chars:
            raise RequestError(f"{field}: has {len(text)} characters, more than the {self.max_chars} "
                               f"({CHARS_PER_TOKEN_BOUND} per token) that could fit max_model_len "
                               f"{self.max_model_len}; shorten it")

    def check_ids(self, ids: list, field: str = "prompt") -> None:
        if len(ids) >= self.max_model_len:
            raise RequestError(f"{field}: has {len(ids)} tokens but max_model_len is {self.max_model_len} (one "
                               f"position must stay free for output); shorten the prompt")

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prompt(self, prompt: str | list[int]) -> dict[str, Any]:
        """A completion prompt (text or token ids) as an engine prompt; text is tokenized off the loop."""
        if not isinstance(prompt, str):
            self.check_ids(prompt)
            return {"prompt_token_ids": prompt}
        self.check_text(prompt)
        text, ids = await self._off_loop(self.engine.tokenize, prompt)
        self.check_ids(ids)  # before the engine's own checks walk the ids on the event loop
        return {"prompt": text, "prompt_token_ids": ids}

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """/tokenize's token ids of `text`."""
        self.check_text(text)
        if add_special_tokens:
            return (await self._off_loop(self.engine.tokenize, text))[1]
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise RequestError("prompt: this model has no tokenizer")
        try:
            return list(await self._off_loop(lambda: tokenizer.encode(text, add_special_tokens=False)))
        except Exception as e:
            raise RequestError(f"prompt: the tokenizer cannot encode it ({type(e).__name__}: {e})") from e

    async def chat(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
                   check_length: bool = True, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A conversation rendered by the chat template, off the loop (`check_length`: refuse one over the
        context, as a generation would be; /tokenize only counts; `tools`: the template's tool declarations)."""
        self.check_text("".join(str(m.get("content") or "") for m in conversation), "messages")
        prompt = await self._off_loop(lambda: render_chat(self.engine.tokenizer, conversation,
                                                          add_generation_prompt=add_generation_prompt,
                                                          tools=tools))
        if check_length:
            self.check_ids(prompt["prompt_token_ids"], "messages")
        return prompt

    async def decode(self, token_ids: list[int]) -> str:
        """/detokenize's text, off the loop: at most `MAX_DETOKENIZE_CONTEXTS` contexts' worth of tokens, each in
        the vocabulary."""
        limit = MAX_DETOKENIZE_CONTEXTS * self.max_model_len
        if len(token_ids) > limit:
            raise RequestError(f"tokens: has {len(token_ids)} tokens, more than the limit of {limit} "
                               f"({MAX_DETOKENIZE_CONTEXTS} x max_model_len {self.max_model_len})")
        vocab = self.engine.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})")
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise RequestError("tokens: this model has no tokenizer")
        return await self._off_loop(tokenizer.decode, token_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_stop(stop: str | list[str] | None) -> None:
    """Bound the stop strings: each is searched for in every new piece of text of the request."""
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: has {len(stops)} strings, more than the limit of {MAX_STOP_STRINGS}")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise RequestError(f"stop: a stop string has {longest} characters, more than the limit of "
                           f"{MAX_STOP_CHARS}")
