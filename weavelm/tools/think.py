"""`<think>...</think>` reasoning parsers. `qwen3`: an output that opens with `<think>` (after optional whitespace)
reasons until `</think>`, the rest is content; an output that does not open with it is all content. `deepseek_r1`
(DeepSeek-R1 and templates that put `<think>` in the prompt): the output reasons until `</think>` (a leading
`<think>` is skipped), all of it when there is no `</think>`. A reasoning block cut off before `</think>` (by
max_tokens) is reasoning in both, streamed or not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.tools.calls import partial_tag_length
from weavelm.tools.interfaces import DeltaMessage, ReasoningParser

START, END = "<think>", "</think>"


class ThinkReasoningParser(ReasoningParser):
    name = "qwen3"
    description = "<think>...</think> at the start of the output (Qwen3, QwQ)"
    implicit_start = False  # True: the output starts inside the reasoning block (its <think> is in the prompt)

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self.reasoning_sent = 0
        self.content_sent = 0

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of `text`; while streaming (`final` False) a possible partial tag is held back."""
        stripped = text.lstrip()
        if stripped.startswith(START):
            body = stripped[len(START):]
        elif self.implicit_start:
            body = text
        elif not final and START.startswith(stripped):
            return "", ""  # the output may still open with <think>
        else:
            return "", text
        reasoning, closed, content = body.partition(END)
        if not closed and not final:
            reasoning = reasoning[:len(reasoning) - partial_tag_length(reasoning, END)]
        return reasoning, content

    def extract_reasoning(self, model_output: str, request: Any = None) -> tuple[str | None, str | None]:
        reasoning, content = self.split(model_output, final=True)
        return reasoning or None, content or None

    def extract_reasoning_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                    previous_token_ids: Sequence[int] = (), current_token_ids: Sequence[int] = (),
                                    delta_token_ids: Sequence[int] = (), request: Any = None
                                    ) -> DeltaMessage | None:
        reasoning, content = self.split(current_text, final=False)
        delta = DeltaMessage()
        if len(reasoning) > self.reasoning_sent:
            delta.reasoning_content = reasoning[self.reasoning_sent:]
            self.reasoning_sent = len(reasoning)
        if len(content) > self.content_sent:
            delta.content = content[self.content_sent:]
            self.content_sent = len(content)
        return None if delta.is_empty() else delta


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    name = "deepseek_r1"
    description = "reasoning until </think> (DeepSeek-R1: the template opens <think> in the prompt)"
    implicit_start = True


@hookimpl
def weavelm_register(registry):
    registry.add("reasoning_parser", ThinkReasoningParser.name, ThinkReasoningParser)
    registry.add("reasoning_parser", DeepSeekR1ReasoningParser.name, DeepSeekR1ReasoningParser)
