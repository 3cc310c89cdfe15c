"""Requests as the engine core sees them, and the user-facing SamplingParams."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from weavelm.errors import RequestError


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction; bad values raise RequestError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    priority: int = 0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def bad(field_name: str, value, rule: str) -> RequestError:
            return RequestError(f"SamplingParams.{field_name}: {rule} (got {value!r})")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1; ask for at least one token")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0; use 0 for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]; use 1 to disable nucleus sampling")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "must be >= 0 (0 or -1 disables top-k)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]; use 0 to disable")
        if any(not s for s in self.stop):
            raise bad("stop", self.stop, "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # everything above this line is unfinished
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


class Request:
    """One request's state inside the engine core. Owned by the scheduler."""

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "sampling_params",
        "eos_token_id", "arrival_time", "status", "num_computed_tokens", "num_cached_tokens",
        "num_preemptions", "block_hashes", "stop_reason", "logprobs",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: int | None = None, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling; -1 until scheduled
        self.num_preemptions = 0
        self.block_hashes: list[int] = []
        self.stop_reason: int | str | None = None
        self.logprobs: list[float] = []

    @property
    def priority(self) -> int:
        return self.sampling_params.priority

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
