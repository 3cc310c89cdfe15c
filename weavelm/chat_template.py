"""The one chat-template renderer: a conversation -> the engine prompt `{"prompt": text, "prompt_token_ids": ids}`.
Used by `LLM.chat`, `weavelm generate --chat` and the server's /v1/chat/completions and /tokenize."""

from __future__ import annotations

from typing import Any

from weavelm.errors import RequestError


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                chat_template_kwargs: dict[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Render `conversation` (a list of {"role", "content"} dicts) with the tokenizer's chat template, or
    `chat_template` when given, and encode the text without adding special tokens on top of the template's own (as
    vLLM's `LLM.chat` does). `tools` (OpenAI's function declarations) go to the template as its `tools`. Raises RequestError naming `messages` when there is no template or it cannot render
    them."""
    if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise RequestError("messages: this model's tokenizer has no chat template; pass a chat template or send a "
                           "formatted prompt to the completions API")
    if not conversation:
        raise RequestError("messages: give at least one message")
    kwargs = dict(chat_template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    if tools:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kwargs)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except Exception as e:  # the template's own checks (roles, order), jinja errors, unencodable text
        raise RequestError(f"messages: the chat template cannot render them ({type(e).__name__}: {e})") from e
    return {"prompt": text, "prompt_token_ids": ids}
