"""Structured outputs (JSON schema, regex, choice, EBNF grammar) through xgrammar: `backend` compiles a request's
`StructuredOutputsParams` and follows its output; `runner` keeps the model runner's matchers and fills the step's
token bitmask, which the sampler applies before sampling."""

from weavelm.structured.backend import GrammarCompiler, RequestGrammar, StructuredOutputError

__all__ = ["GrammarCompiler", "RequestGrammar", "StructuredOutputError"]
