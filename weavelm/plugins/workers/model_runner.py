"""The default ModelRunner: persistent batch, vectorised input preparation, forward, logits, sampling."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.contexts import RunnerContext
from weavelm.core.forward import (AttentionSpec, CommonAttentionMetadata, ForwardBatch, kv_window, make_layer_impl,
                                  smallest_window)
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import ModelRunner
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.plugins.workers.cpu_threads import choose_cpu_threads
from weavelm.plugins.workers.input_batch import CachedRequestState, InputBatch
from weavelm.core.multimodal import supports_multimodal
from weavelm.plugins.workers.model_loading import ModelBundle, load_model_bundle
from weavelm.sample.sampler import SampledLogprobs, SamplingMetadata, compute_logprobs, sample
from weavelm.plugins.workers.sampling_inputs import build_sampling_metadata
from weavelm.sample.logprobs import to_token_logprobs
from weavelm.ops.memory import zeros
from weavelm.structured.backend import GrammarCompiler
from weavelm.structured.runner import StructuredOutputs, load_tokenizer
from weavelm.utils import cdiv

logger = logging.getLogger("weavelm.runner")


class RunnerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cuda_graph_max_bs: int = Field(512, ge=0, le=512, description="Largest decode batch captured in a CUDA graph.")


@dataclasses.dataclass
class StepInputs:
    """One step's prepared inputs (`_prepare_inputs`). input_ids, positions: (total tokens,) int64 on the device;
    common: the attention metadata; logits_indices: (sampled rows,) int64, the flat index of each sampled row's last
    token; logits_rows: (sampled rows,) int64 host array, the batch rows that sample this step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    common: CommonAttentionMetadata
    logits_indices: torch.Tensor
    logits_rows: np.ndarray


class PagedModelRunner(ModelRunner):
    name = "paged"
    description = "Persistent batch, vectorised input preparation, paged attention, on-device sampling."
    Options = RunnerOptions

    def __init__(self, options: RunnerOptions, context: RunnerContext):
        super().__init__(options, context)
        self.bundle: ModelBundle | None = None
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.max_num_reqs = context.limits.max_num_seqs
        self.max_num_tokens = context.limits.max_num_batched_tokens
        self.block_size = context.config.cache.block_size
        self.graphs = None
        self.spec = None  # SpecDecodeRunner when `speculative:` is configured
        self.logits_hook = None  # set_logits_hook: (req_ids, logits) -> replacement logits or None
        # the last launched step's samples, still on the device: ({req_id: index}, ids). With async scheduling the
        # next step is prepared before they are folded into the batch, and takes its input tokens from them.
        self._inflight: tuple[dict[str, int], torch.Tensor] | None = None
        self._last_future: RunnerFuture | None = None  # the last launched step's, collected or not
        self._sampling_rng = random.Random(context.config.seed)  # per-step seeds of the one-pass sampler
        self.pooler = None  # `runner: pooling`: weavelm.pooling.Pooler, built in load_model
        self.structured = StructuredOutputs(self._grammar_compiler)  # grammar matchers of constrained requests
        self.mm = None  # EncoderRunner for a multimodal model (plugins/workers/multimodal.py)

    # -- setup --------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(choose_cpu_threads(self.context.config.num_threads))
        self.bundle = load_model_bundle(self.context)
        b = self.bundle
        if self.config.runner == "pooling":
            from weavelm.pooling.config import resolve_pooler
            from weavelm.pooling.pooler import Pooler
            resolved = resolve_pooler(self.config.model, self.config.pooler)
            logger.info("pooling runner: %s pooling, normalize=%s (%s)", resolved.pooling_type, resolved.normalize,
                        resolved.source)
            self.pooler = Pooler(resolved)
        self.max_model_len = b.max_model_len
        if supports_multimodal(b.model):
            from weavelm.plugins.workers.multimodal import EncoderRunner
            self.mm = EncoderRunner(b.model, self.device, b.dtype)
        self.max_blocks_per_req = cdiv(self.max_model_len, self.block_size)
        self.batch = InputBatch(self.max_num_reqs, self.max_model_len, self.max_blocks_per_req)
        num_layers, num_heads, num_kv_heads, head_size = b.model.attention_layout()
        self.windows = b.model.attention_windows()
        spec = AttentionSpec(self.device.type, b.dtype, head_size, num_heads, num_kv_heads, self.block_size,
                             smallest_window(self.windows))
        self.attn_backend = self.context.attention_backend(spec)
        self.attn_impls = [make_layer_impl(self.attn_backend, num_heads, num_kv_heads, head_size, w)
                           for w in self.windows]
        self.attn_builder = self.attn_backend.make_builder(self.device)
        self.layout = (num_layers, num_heads, num_kv_heads, head_size)
        self.lora = self.context.lora_manager() if self.context.lora_manager is not None else None
        if self.lora is not None:
            self.lora_targets = self.lora.attach(b.model, self.device, b.dtype,
                                                 max(self.max_num_tokens, self.max_num_reqs))
        if self.context.build_proposer is not None:
            from weavelm.spec_decode.batch import SpecDecodeLimits
            from weavelm.spec_decode.runner import SpecDecodeRunner

            proposer = self.context.build_proposer(self.context, self.block_size, self._load_other_model)
            self.spec = SpecDecodeRunner(proposer, self.batch,
                                         SpecDecodeLimits(self.block_size, self.max_model_len, self.device))
            self.spec.proposer.load(self.model_info())

    def _grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler for this model's tokenizer (built on the first constrained request)."""
        return GrammarCompiler(load_tokenizer(self.config, self.context.loader), self.bundle.vocab_size)

    def _load_other_model(self, model: str, dtype: str) -> ModelBundle:
        """Load another model (a draft) like the target: same loader, device and tensor-parallel group."""
        config = self.config.model_copy(update={"model": model, "dtype": dtype, "max_model_len": None})
        return load_model_bundle(dataclasses.replace(self.context, config=config))

    def model_info(self) -> dict[str, Any]:
        b = self.bundle
        return {"max_model_len": b.max_model_len, "vocab_size": b.vocab_size, "dtype": str(b.dtype),
                "attention": self.attn_backend.name, "architecture": type(b.model).__name__,
                # KV blocks older than this many positions are read by no layer (the scheduler frees them); a
                # draft model addresses the same blocks with its own layers, so then nothing is freed
                "sliding_window": None if self.spec is not None and self.spec.proposer.uses_kv_cache
                else kv_window(self.windows),
                **({"lora_targets": self.lora_targets} if self.lora is not None else {})}

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, _, num_kv_heads, head_size = self.layout
        elem = torch.empty((), dtype=self.bundle.dtype).element_size()
        one_block = self.attn_backend.kv_cache_shape(1, self.block_size, num_kv_heads, head_size)
        draft = self.spec.proposer.kv_cache_bytes_per_block() if self.spec is not None else 0
        return num_layers * math.prod(one_block) * elem + draft

    def initialize_kv_cache(self, num_blocks: int) -> None:
        num_layers, _, num_kv_heads, head_size = self.layout
        shape = self.attn_backend.kv_cache_shape(num_blocks, self.block_size, num_kv_heads, head_size)
        self.kv_caches = [zeros(shape, self.bundle.dtype, self.device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        if self.spec is not None:
            self.spec.proposer.initialize_kv_cache(num_blocks)
        if (self.device.type == "cuda" and not self.config.enforce_eager and self.options.cuda_graph_max_bs > 0
                and self.pooler is None):  # a pooling engine runs prompts only: no decode to capture
            if not self.attn_backend.graph_safe:
                logger.warning("attention backend %s is not CUDA-graph safe; running eagerly",
                               self.attn_backend.name)
                return
            from weavelm.plugins.workers.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, min(self.max_num_reqs, self.options.cuda_graph_max_bs), self.lora)
            self.graphs.capture()

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Run a forward of `max_num_batched_tokens` tokens (with a KV cache just large enough for that batch)
        plus sampling of `max_num_seqs` rows, and return the peak device bytes."""
        from weavelm.plugins.workers.profiling import profile_run
        return profile_run(self)

    # -- per step -----------------------------------------------------------------------------------------
    def get_model(self) -> torch.nn.Module:
        return self.bundle.model

    def cached_request_ids(self) -> list[str]:
        return list(self.requests)

    def get_proposer(self) -> Any:
        return self.spec.proposer if self.spec is not None else None

    def set_logits_hook(self, hook) -> None:
        self.logits_hook = hook

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.batch
        if self.mm is not None:
            self.mm.update(scheduler_output)
        if self.spec is not None:
            self.spec.forget_requests(scheduler_output)
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)
        self.structured.remove(scheduler_output.finished_req_ids)
        unscheduled = {r for r in batch.req_ids if r not in scheduler_output.num_scheduled_tokens}
        batch.remove(set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids) | unscheduled)
        for nr in scheduler_output.scheduled_new_reqs:
            sp = nr.sampling_params
            gen = None
            if sp.seed is not None and sp.temperature > 0:
                gen = torch.Generator(device=self.device).manual_seed(sp.seed)
            state = CachedRequestState(nr.req_id, nr.prompt_token_ids, sp, list(nr.block_ids),
                                       nr.num_computed_tokens, generator=gen, lora_request=nr.lora_request)
            if sp.prompt_logprobs is not None:
                state.prompt_logprobs = [None] * len(nr.prompt_token_ids)
            self.requests[nr.req_id] = state
            self.structured.add_request(nr.req_id, sp)
            batch.add(state)
        c = scheduler_output.scheduled_cached_reqs
        for rid, resumed, new_blocks, num_computed in zip(c.req_ids, c.resumed_from_preemption, c.new_block_ids,
                                                          c.num_computed_tokens):
            state = self.requests[rid]
            state.num_computed_tokens = num_computed
            if resumed:
                state.block_ids = list(new_blocks)
            else:
                state.block_ids.extend(new_blocks)
            row = batch.index.get(rid)
            if row is None:
                batch.add(state)
            else:
                batch.num_computed[row] = num_computed
                if resumed:
                    batch.set_blocks(row, new_blocks)
                else:
                    batch.append_blocks(row, new_blocks)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        batch = self.batch
        num_reqs = batch.num_reqs
        num_scheduled = np.fromiter((scheduler_output.num_scheduled_tokens[r] for r in batch.req_ids),
                                    dtype=np.int64, count=num_reqs)
        query_end = np.cumsum(num_scheduled)  # each row's end offset in the flat token batch
        total = int(query_end[-1])
        token_req = np.repeat(np.arange(num_reqs), num_scheduled)
        positions = batch.num_computed[token_req] + (np.arange(total) - np.repeat(query_end - num_scheduled,
                                                                                 num_scheduled))
        input_ids = batch.token_ids[token_req, positions]
        bs = self.block_size
        slots = batch.block_table[token_req, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = batch.num_computed[:num_reqs] + num_scheduled
        # rows whose last scheduled token was sampled by the previous step and is not folded in yet (async; with
        # speculative decoding the positions past the known tokens hold this step's drafts instead)
        pending_rows = np.nonzero(seq_lens > batch.num_tokens[:num_reqs])[0] if self.spec is None else ()
        num_pending = len(pending_rows)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        query_start_loc[1:] = query_end
        sampling = seq_lens >= batch.num_tokens[:num_reqs]
        logits_rows = np.nonzero(sampling)[0]
        max_blocks = int(cdiv(seq_lens.max(), bs))
        num_logits = len(logits_rows)
        # Two host -> device copies per step: every int64 input packed in one buffer, every int32 in another.
        # int64 layout: input_ids, positions, slot_mapping (total each), logits_indices (num_logits), then for the
        # pending rows the flat index of their last token and the index of its sample in the previous step's ids.
        int64_inputs = np.empty(3 * total + num_logits + 2 * num_pending, dtype=np.int64)
        int64_inputs[:total], int64_inputs[total:2 * total], int64_inputs[2 * total:3 * total] = \
            input_ids, positions, slots
        logits_end = 3 * total + num_logits
        int64_inputs[3 * total:logits_end] = query_end[logits_rows] - 1
        if num_pending:
            assert self._inflight is not None, "a position past the known tokens with no step in flight"
            index = self._inflight[0]
            int64_inputs[logits_end:logits_end + num_pending] = query_end[pending_rows] - 1
            int64_inputs[logits_end + num_pending:] = [index[batch.req_ids[row]] for row in pending_rows.tolist()]
        # int32 layout: query_start_loc (num_reqs + 1), seq_lens (num_reqs), block_table (num_reqs x max_blocks)
        int32_inputs = np.empty(2 * num_reqs + 1 + num_reqs * max_blocks, dtype=np.int32)
        int32_inputs[:num_reqs + 1], int32_inputs[num_reqs + 1:2 * num_reqs + 1] = query_start_loc, seq_lens
        int32_inputs[2 * num_reqs + 1:].reshape(num_reqs, max_blocks)[:] = batch.block_table[:num_reqs, :max_blocks]
        dev_int64, dev_int32 = self._to_device(int64_inputs), self._to_device(int32_inputs)
        if num_pending:  # the previous step's samples, straight from the device: no host round trip between steps
            pending_flat = dev_int64[logits_end:logits_end + num_pending]
            dev_int64[:total][pending_flat] = self._inflight[1][dev_int64[logits_end + num_pending:]]
        if self.lora is not None:
            self.lora.prepare([s.lora_request for s in batch.states[:num_reqs]], num_scheduled, logits_rows)
        common = CommonAttentionMetadata(
            query_start_loc=dev_int32[:num_reqs + 1], seq_lens=dev_int32[num_reqs + 1:2 * num_reqs + 1],
            block_table=dev_int32[2 * num_reqs + 1:].view(num_reqs, max_blocks),
            slot_mapping=dev_int64[2 * total:3 * total],
            query_start_loc_cpu=torch.from_numpy(int32_inputs[:num_reqs + 1]),
            seq_lens_cpu=torch.from_numpy(int32_inputs[num_reqs + 1:2 * num_reqs + 1]), num_reqs=num_reqs,
            num_actual_tokens=total, max_query_len=int(num_scheduled.max()), max_seq_len=int(seq_lens.max()),
            block_size=bs)
        return StepInputs(dev_int64[:total], dev_int64[total:2 * total], common, dev_int64[3 * total:logits_end],
                          logits_rows)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A fresh device tensor of `a`. On CUDA the copy is asynchronous, through pinned memory from torch's
        caching host allocator, which keeps the buffer until the copy has run (so steps may overlap); a copy from
        pageable memory would wait for the device to finish its queued work."""
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        return staged.to(self.device, non_blocking=True)

    def _sampling_metadata(self, rows: np.ndarray, vocab_size: int) -> SamplingMetadata:
        step_seed = self._sampling_rng.getrandbits(31) if self.device.type == "cuda" else None
        return build_sampling_metadata(self.batch, rows, self.device, vocab_size, self._to_device, step_seed)

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is not None:
            return self.bundle.model(input_ids, positions, fb, inputs_embeds=inputs_embeds)
        return self.bundle.model(input_ids, positions, fb)

    def _preprocess(self, scheduler_output: SchedulerOutput, input_ids: torch.Tensor, positions: torch.Tensor
                    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Multimodal models: run the scheduled encoders; return the step's `inputs_embeds` (None: no placeholder
        among this step's tokens) and the positions the model takes ((3, tokens) for M-RoPE models). A step with
        either runs eagerly; others keep the plain path and CUDA graphs."""
        if self.mm is None:
            return None, positions
        batch, n = self.batch, self.batch.num_reqs
        req_ids, num_computed = batch.req_ids[:n], batch.num_computed[:n]
        if self.mm.uses_mrope:
            counts = scheduler_output.num_scheduled_tokens
            num_scheduled = np.fromiter((counts[r] for r in req_ids), dtype=np.int64, count=n)
            positions = self.mm.mrope_positions(req_ids, num_computed, num_scheduled, positions.device)
        return self.mm.preprocess(scheduler_output, req_ids, num_computed, input_ids), positions

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Update the batch, prepare inputs and launch forward + sampling; the returned future's `result()`
        waits for the sampled ids (the step's one device -> host sync) and folds them into the batch."""
        self._update_states(scheduler_output)
        if self.pooler is not None:
            return RunnerFuture(self._pool_step(scheduler_output))
        batch = self.batch
        if scheduler_output.total_num_scheduled_tokens == 0 or batch.num_reqs == 0:
            return RunnerFuture(ModelRunnerOutput([], {}, [], None))
        spec = self.spec.prepare(scheduler_output) if self.spec is not None else None
        inputs = self._prepare_inputs(scheduler_output)
        input_ids, positions, common = inputs.input_ids, inputs.positions, inputs.common
        logits_indices, rows = inputs.logits_indices, inputs.logits_rows
        inputs_embeds, positions = self._preprocess(scheduler_output, input_ids, positions)
        step = sample_rows = None
        if spec is not None:
            step = self.spec.make_step(spec, rows)
            logits_indices, sample_rows = step.logits_indices(rows, common.query_start_loc_cpu[1:].numpy(),
                                                              self.device)
            if self.lora is not None:  # the LM head's adapter rows follow the verified positions
                counts = np.diff(common.query_start_loc_cpu.numpy())
                self.lora.prepare([s.lora_request for s in batch.states[:batch.num_reqs]], counts, sample_rows)
        prompt_lp_rows = np.nonzero(batch.wants_prompt_logprobs[:batch.num_reqs])[0]
        if (self.graphs is not None and not len(prompt_lp_rows) and inputs_embeds is None and positions.dim() == 1
                and self.graphs.can_run(common)):
            hidden, logits = self.graphs.run(input_ids, positions, common)
            logits_hidden, logits = hidden[logits_indices], logits[logits_indices]
        else:
            fb = ForwardBatch(self.attn_builder.build(common), self.kv_caches, self.attn_impls)
            hidden = self.run_model(input_ids, positions, fb, inputs_embeds)
            logits_hidden = hidden[logits_indices]
            logits = self.bundle.model.compute_logits(logits_hidden)
            if len(prompt_lp_rows):
                self._prompt_logprobs(hidden, common, prompt_lp_rows)
        # the proposer's input: the target's hidden states at the logits rows (the sampled positions)
        proposer_hidden = logits_hidden if self.spec is not None and self.spec.wants_hidden_states else None
        if step is not None or self.logits_hook is not None:  # greedy and plain sampling cast only if they must
            logits = logits.float()
        if self.logits_hook is not None:
            hook_rows = rows if step is None else sample_rows
            replaced = self.logits_hook([batch.req_ids[r] for r in hook_rows.tolist()], logits)
            logits = logits if replaced is None else replaced
        constrained = self.structured.has_rows(batch.req_ids, rows)
        if self._last_future is not None and (constrained or batch.processed[rows].any()):
            # penalties, bad words, min_tokens and grammars read the output tokens: fold the previous step's in
            # first (the forward is launched already: on a device it runs meanwhile)
            self._last_future.result()
        meta = self._sampling_metadata(rows if step is None else sample_rows, logits.shape[-1])
        if constrained:  # the grammar bitmask, filled on the host while the device runs the forward
            meta.allowed = self.structured.allowed_tokens(batch, rows, logits.device,
                                                          None if step is None else step.drafts)
        if step is not None:
            ids, lps = step.sample(logits, meta)
        else:
            ids, lps = sample(logits, meta)
        if step is not None:  # drafts were verified: the accepted runs are folded by `SpecStep.fold`
            return _StepFuture(self, rows, ids, lps, step, proposer_hidden)
        return self._launched(rows, ids, lps, proposer_hidden)

    def _pool_step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """A pooling engine's step: forward the scheduled prompt chunks and pool the final hidden states of the
        prompts that finish (`weavelm.pooling.Pooler`); nothing is sampled."""
        batch = self.batch
        self.pooler.forget(scheduler_output.finished_req_ids)
        req_ids = list(batch.req_ids)
        if scheduler_output.total_num_scheduled_tokens == 0 or batch.num_reqs == 0:
            return ModelRunnerOutput([], {}, [], None)
        inputs = self._prepare_inputs(scheduler_output)
        fb = ForwardBatch(self.attn_builder.build(inputs.common), self.kv_caches, self.attn_impls)
        inputs_embeds, positions = self._preprocess(scheduler_output, inputs.input_ids, inputs.positions)
        hidden = self.run_model(inputs.input_ids, positions, fb, inputs_embeds)
        n = batch.num_reqs
        pooled = self.pooler.pool(hidden, req_ids, inputs.common.query_start_loc_cpu.tolist(),
                                  batch.num_computed[:n].tolist(), [len(s.prompt_token_ids) for s in batch.states[:n]])
        return ModelRunnerOutput(req_ids, {rid: i for i, rid in enumerate(req_ids)}, [[] for _ in req_ids],
                                 pooler_output=pooled)

    def _launched(self, rows: np.ndarray, ids: torch.Tensor, lps, proposer_hidden: torch.Tensor | None
                  ) -> RunnerFuture:
        """The step's future. Everything it reports is taken from the batch now, since with async scheduling the
        next step rearranges the batch before this one is collected; its samples are folded in by request id."""
        batch = self.batch
        req_ids = list(batch.req_ids)
        row_list = rows.tolist()
        sampled_req_ids = [req_ids[r] for r in row_list]
        self._inflight = ({rid: i for i, rid in enumerate(sampled_req_ids)}, ids)
        want = None if lps is None else [batch.states[r].sampling_params.num_logprobs for r in row_list]
        self._last_future = _AsyncStepFuture(self, req_ids, row_list, sampled_req_ids, _HostCopy(ids, lps), want,
                                             self._take_prompt_logprobs(rows), proposer_hidden)
        return self._last_future

    def _fold_sampled(self, req_ids: list[str], token_ids: list[int]) -> None:
        """Append one sampled token per request: to its batch row, or to its state if it left the batch."""
        batch, index = self.batch, self.batch.index
        for rid, tok in zip(req_ids, token_ids):
            row = index.get(rid)
            if row is not None:
                batch.token_ids[row, batch.num_tokens[row]] = tok
                batch.num_tokens[row] += 1
            else:
                state = self.requests.get(rid)
                if state is not None:
                    state.output_token_ids.append(tok)

    def _prompt_logprobs(self, hidden: torch.Tensor, common, req_rows: np.ndarray) -> None:
        """Fill each asking request's prompt logprobs for the prompt tokens this step's chunk predicts (the logits
        at position p score prompt token p + 1). Recomputed chunks (after preemption) overwrite their entries."""
        batch, start_loc = self.batch, common.query_start_loc_cpu.tolist()
        for row in req_rows.tolist():
            state = batch.states[row]
            if state.prompt_logprobs is None:
                continue
            first = int(batch.num_computed[row])
            last = min(first + start_loc[row + 1] - start_loc[row], len(state.prompt_token_ids) - 1)
            if last <= first:
                continue
            h = hidden[start_loc[row]:start_loc[row] + last - first]
            if self.lora is not None:
                self.lora.set_head_rows(state.lora_request, len(h))
            logprobs = self.bundle.model.compute_logits(h).float().log_softmax(-1)
            targets = state.prompt_token_ids[first + 1:last + 1]
            k = state.sampling_params.prompt_logprobs
            lp = compute_logprobs(logprobs, torch.tensor(targets, device=logprobs.device), k)
            state.prompt_logprobs[first + 1:last + 1] = to_token_logprobs(targets, lp, [k] * len(targets))

    def _finish_step(self, rows: np.ndarray, ids: torch.Tensor, lps, step, proposer_hidden: torch.Tensor | None
                     ) -> ModelRunnerOutput:
        """A speculative step's result: its accepted runs folded into the batch, then the next drafts proposed."""
        sampled, logprobs = step.fold(self.batch, rows, ids.cpu().numpy(), lps)  # the step's one device sync
        out = ModelRunnerOutput(list(self.batch.req_ids), dict(self.batch.index), sampled, logprobs,
                                self._take_prompt_logprobs(rows))
        self.spec.after_step(out, rows, step, proposer_hidden)
        self.structured.cut_drafts(self.batch, out.spec_token_ids)
        return out

    def _take_prompt_logprobs(self, rows: np.ndarray) -> dict:
        """Prompt logprobs of the sampled rows whose prompt is complete, taken from their state (sent once)."""
        batch = self.batch
        prompt_logprobs = {}
        for row in rows[batch.wants_prompt_logprobs[rows]].tolist():
            state = batch.states[row]
            if state.prompt_logprobs is not None:  # the prompt finished: send its logprobs once
                prompt_logprobs[state.req_id], state.prompt_logprobs = state.prompt_logprobs, None
                batch.wants_prompt_logprobs[row] = False
        return prompt_logprobs


class _StepFuture(RunnerFuture):
    def __init__(self, runner: PagedModelRunner, rows: np.ndarray, ids: torch.Tensor, lps, step,
                 proposer_hidden: torch.Tensor | None):
        super().__init__()
        self._args = (runner, rows, ids, lps, step, proposer_hidden)

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            runner, rows, ids, lps, step, proposer_hidden = self._args
            self._output = runner._finish_step(rows, ids, lps, step, proposer_hidden)
            self._args = None
        return self._output


class _HostCopy:
    """A step's sampled ids (and logprobs) on their way to the host: on CUDA, asynchronous copies into pinned
    memory and an event after them, so collecting step N waits for step N only, not for step N+1 queued behind."""

    def __init__(self, ids: torch.Tensor, lps: SampledLogprobs | None):
        self.event = None
        if ids.device.type != "cuda":
            self.ids, self.lps = ids, lps
            return
        self.ids = self._copy(ids)
        self.lps = None if lps is None else SampledLogprobs(*(self._copy(t) for t in dataclasses.astuple(lps)))
        self.event = torch.cuda.Event()
        self.event.record()

    @staticmethod
    def _copy(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class _AsyncStepFuture(RunnerFuture):
    def __init__(self, runner: PagedModelRunner, req_ids: list[str], rows: list[int], sampled_req_ids: list[str],
                 host: _HostCopy, want: list | None, prompt_logprobs: dict, proposer_hidden: torch.Tensor | None):
        super().__init__()
        self._args = (runner, req_ids, rows, sampled_req_ids, host, want, prompt_logprobs, proposer_hidden)

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            runner, req_ids, rows, sampled_req_ids, host, want, prompt_logprobs, proposer_hidden = self._args
            host.wait()  # the step's one device -> host sync
            ids = host.ids.tolist()
            runner._fold_sampled(sampled_req_ids, ids)
            sampled: list[list[int]] = [[] for _ in req_ids]
            for row, tok in zip(rows, ids):
                sampled[row] = [tok]
            logprobs = None
            if host.lps is not None:
                logprobs = [None] * len(req_ids)
                for row, entry in zip(rows, to_token_logprobs(ids, host.lps, want)):
                    logprobs[row] = None if entry is None else [entry]
            index = {rid: i for i, rid in enumerate(req_ids)}
            self._output = ModelRunnerOutput(req_ids, index, sampled, logprobs, prompt_logprobs)
            self._args = None
            if runner.spec is not None:  # a step without drafts (synchronous then): propose the next ones
                runner.spec.after_step(self._output, np.asarray(rows, dtype=np.int64), None, proposer_hidden)
                runner.structured.cut_drafts(runner.batch, self._output.spec_token_ids)
        return self._output


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model_runner", PagedModelRunner.name, PagedModelRunner, aliases=("model_runner",))
