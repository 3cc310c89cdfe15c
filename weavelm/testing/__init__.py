"""The test kit shipped to plugin authors: contract suites per component kind and parity helpers.

An outside distribution tests its own component the way the built-ins are tested, e.g. in its `tests/`:

    from weavelm.testing.attention import AttentionContract

    class TestMyBackend(AttentionContract):
        backend = "my_backend"            # the registered name (found through the installed entry point)

Parity helpers (`prompt_logits`, `teacher_forced_logits`) run a prompt through a real `LLM`.
"""

from weavelm.testing.parity import prompt_logits, teacher_forced_logits

__all__ = ["prompt_logits", "teacher_forced_logits"]
