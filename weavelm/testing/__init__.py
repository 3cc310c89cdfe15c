"""The test kit shipped to plugin authors: contract suites per component kind and parity helpers.

An outside distribution tests its own component the way the built-ins are tested, e.g. in its `tests/`:

    from weavelm.testing.attention import AttentionContract

    class TestMyBackend(AttentionContract):
        backend = "my_backend"            # the registered name (found through the installed entry point)

Parity helpers (`prompt_logits`, `teacher_forced_logits`) run a prompt through a real `LLM`. `StepRecorder`
collects every step's stats through the `weavelm_step_finished` hook (e.g. to check that a preemption happened);
`component(kind, name)` and `names(kind)` look components up in the installed registry.
"""

from weavelm.testing._attention_batches import AttentionBatch, make_batch, reference_output, rel_err
from weavelm.testing._registry import component, names
from weavelm.testing._scheduler_driver import EOS, VOCAB, Driver, FakeRunner, check_scheduler, fake_token, make_request
from weavelm.testing.attention import AttentionContract, triton_interpreter_without_cuda
from weavelm.testing.executor import ExecutorContract
from weavelm.testing.loader import LoaderContract
from weavelm.testing.parity import prompt_logits, teacher_forced_logits
from weavelm.testing.proposer import ProposerContract
from weavelm.testing.scheduler import SchedulerContract
from weavelm.testing.stats import StepRecorder

__all__ = [
    "AttentionContract", "SchedulerContract", "LoaderContract", "ExecutorContract", "ProposerContract",
    "AttentionBatch", "make_batch", "reference_output", "rel_err", "triton_interpreter_without_cuda",
    "Driver", "FakeRunner", "make_request", "fake_token", "check_scheduler", "EOS", "VOCAB",
    "prompt_logits", "teacher_forced_logits", "StepRecorder", "component", "names",
]
