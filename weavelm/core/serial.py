"""The wire format between the frontend (core/mp_client.py) and the engine-core process (EngineCoreProc).

A message is `(kind, payload)`. Kinds and payloads:

- frontend -> core: ADD `list[tuple]` (`request_to_wire` of each new request: only its constructor arguments
  travel, not the core-side state a `Request` also holds; multimodal items as `MultiModalFeature.to_row()` lists,
  their tensors as embedded pickles); ABORT `list[str]`; UTILITY `(call_id, method, args)`;
  SHUTDOWN `None`.
- core -> frontend: READY `dict` (model_info, max_model_len, num_blocks, pid); OUTPUTS `list[EngineCoreOutput]`
  (one step's deltas); UTILITY_RESULT `(call_id, ok, value)` (value: the result, or the exception when not ok);
  DEAD `(message, traceback_text, exception_or_None)`, sent by the core just before it exits on an error.

`SERIALIZER` (`MsgpackSerializer`, msgspec) is the one in use: `benchmarks/engine_process_overhead.py` measures
it against plain pickle (protocol 5) on a 1000-token request and a 256-request step, where pickle spends its
time rebuilding dataclasses from `__reduce_ex__` state (numbers in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import operator
import pickle
from typing import Any

from weavelm.core.multimodal import MultiModalFeature
from weavelm.core.outputs import EngineCoreOutput
from weavelm.core.request import Request, SamplingParams, StructuredOutputsParams
from weavelm.lora.request import LoRARequest

# frontend -> core
ADD, ABORT, UTILITY, SHUTDOWN = 0, 1, 2, 3
# core -> frontend
READY, OUTPUTS, UTILITY_RESULT, DEAD = 10, 11, 12, 13


def request_to_wire(r: Request) -> tuple:
    mm = [f.to_row() for f in r.mm_features] if r.mm_features else None
    return (r.request_id, r.prompt_token_ids, r.sampling_params, r.eos_token_id, r.arrival_time, r.lora_request, mm)


def request_from_wire(row: tuple | list) -> Request:
    rid, ids, params, eos, arrival, lora, mm = row
    features = [MultiModalFeature.from_row(f) for f in mm] if mm else None
    return Request(rid, ids, params, eos_token_id=eos, arrival_time=arrival, lora_request=lora,
                   mm_features=features)


class MsgpackSerializer:
    """msgspec msgpack for the hot messages (ADD, OUTPUTS, ABORT), with `SamplingParams` and `EngineCoreOutput`
    flattened to their field values (in `dataclasses.fields` order, so a new field travels without a change
    here). Any other object inside them (a `Logprob`, a tuple stays a list) travels as an embedded pickle (msgpack
    extension type 1); the other messages are pickled whole. `tests/test_engine_process.py` round-trips fully
    populated messages, so a field type this format would alter fails there, not in production."""

    name = "msgspec"

    def __init__(self) -> None:
        import msgspec

        self._enc = msgspec.msgpack.Encoder(enc_hook=_pickle_ext)
        self._dec = msgspec.msgpack.Decoder(ext_hook=_unpickle_ext)
        self._sp_fields = [f.name for f in dataclasses.fields(SamplingParams)]
        self._sp_values = operator.attrgetter(*self._sp_fields)
        self._out_values = operator.attrgetter(*(f.name for f in dataclasses.fields(EngineCoreOutput)))

    def encode(self, kind: int, payload: Any) -> bytes:
        if kind == ADD:
            body: Any = [[rid, ids, self._sp_values(sp), eos, arrival, _lora_row(lora), mm]
                         for rid, ids, sp, eos, arrival, lora, mm in payload]
        elif kind == OUTPUTS:
            body = list(map(self._out_values, payload))
        elif kind == ABORT:
            body = list(payload)
        else:
            body = pickle.dumps(payload, protocol=5)
        return self._enc.encode((kind, body))

    def decode(self, data: bytes | memoryview) -> tuple[int, Any]:
        kind, body = self._dec.decode(data)
        if kind == ADD:
            return kind, [(rid, ids, self._params(sp_row), eos, arrival, _lora_from_row(lora), mm)
                          for rid, ids, sp_row, eos, arrival, lora, mm in body]
        if kind == OUTPUTS:
            return kind, [EngineCoreOutput(*o) for o in body]
        if kind == ABORT:
            return kind, body
        return kind, pickle.loads(body)

    def _params(self, row: list) -> SamplingParams:
        sp = object.__new__(SamplingParams)  # validated by the frontend already
        sp.__dict__.update(zip(self._sp_fields, row))
        if isinstance(sp.structured_outputs, dict):  # msgpack sends a dataclass as a dict
            sp.structured_outputs = StructuredOutputsParams(**sp.structured_outputs)
        return sp


def _lora_row(lora: Any) -> Any:
    """A LoRARequest as its field values (msgpack would turn the dataclass into a dict); a name or None as is."""
    return [lora.lora_name, lora.lora_int_id, lora.lora_path] if isinstance(lora, LoRARequest) else lora


def _lora_from_row(row: Any) -> Any:
    return LoRARequest(*row) if isinstance(row, list) else row


def _pickle_ext(obj: Any) -> Any:
    import msgspec

    return msgspec.msgpack.Ext(PICKLE_EXT, pickle.dumps(obj, protocol=5))


def _unpickle_ext(code: int, data: memoryview) -> Any:
    assert code == PICKLE_EXT, code
    return pickle.loads(data)


PICKLE_EXT = 1
SERIALIZER = MsgpackSerializer
