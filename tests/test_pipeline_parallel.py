"""Pipeline parallelism on the CPU over gloo, fp32, tiny fixtures.

- Engines (one per layout): `pipeline_parallel_size=2` (Qwen3, 3 layers: an uneven split, tied embeddings on the
  last stage) and `tensor_parallel_size=2, pipeline_parallel_size=2` (Llama, 4 gloo ranks), set through `LLM(...)`
  keywords, give greedy tokens identical to transformers on a mixed batch (chunked prefills beside decodes, more
  than one micro-batch in flight, preemption forced by a small KV pool); so does the `ray` executor at pp=2, and
  one `weavelm generate --pipeline-parallel-size 2` run prints transformers' greedy text.
- A killed stage is an EngineDeadError naming its rank and stage within 10 s, and no worker process survives.
- Stage split and loading: a stage builds and reads only its layers (other stages' tensors are never read).
- The group collectives over gloo sub-groups of a tp=2 x pp=2 layout (all-reduce inside a stage, send / isend /
  recv between stages, broadcast).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from tests.model_fixtures import build_tiny_model, hf_greedy
from weavelm import LLM, SamplingParams
from weavelm.core.registry import Registry
from weavelm.errors import ConfigError, EngineDeadError
from weavelm.plugin import hookimpl

# lengths 3..23: long prompts are chunked (budget 12) beside other requests' decodes
PROMPTS = [[1, 17, 300, 42, 5, 99, 250, 7], [31, 400, 8], list(range(10, 33)), [77, 123, 6, 19, 2],
           list(range(200, 214))]
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# 5 requests x up to 31 tokens need ~40 blocks of 4: 16 force preemption; 12 tokens a step split the batch
ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", attention="torch_ref",
              cache={"num_blocks": 16, "block_size": 4},
              scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 12})


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class StepObserver:
    def __init__(self):
        self.stats = []

    @hookimpl
    def weavelm_step_finished(self, stats):
        self.stats.append(stats)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_models")
    qwen3 = build_tiny_model("qwen3", str(root / "qwen3"), seed=21, num_hidden_layers=3, tie_word_embeddings=True)
    llama = build_tiny_model("llama", str(root / "llama"), seed=22, num_hidden_layers=4)
    return {"qwen3": qwen3, "llama": llama}


def want_tokens(path: str) -> list[list[int]]:
    return [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]


def run_mixed(llm: LLM, observer: StepObserver) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert sum(s.num_preempted for s in observer.stats) > 0, "the KV pool did not force a preemption"
    assert any(s.num_running > 1 for s in observer.stats), "no step mixed requests"
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def pp2(models):
    observer = StepObserver()
    registry = Registry.load()
    registry.pm.register(observer)
    llm = LLM(model=models["qwen3"], registry=registry, pipeline_parallel_size=2, **ENGINE)
    yield llm, observer
    llm.shutdown()


def test_pp2_greedy_tokens_match_transformers(pp2, models):
    llm, observer = pp2
    assert llm.llm_engine.config.executor.name == "multiproc"  # pipeline_parallel_size > 1 picks it
    assert llm.llm_engine.config.executor.options.pipeline_parallel_size == 2
    assert run_mixed(llm, observer) == want_tokens(models["qwen3"])
    # each stage holds only its layers: 2 of 3 on the first, 1 on the last (with the tied head's embedding)
    layouts = llm.collective_rpc("apply_model", (_stage_summary,))
    assert layouts == [(0, 2, True, False), (2, 3, True, True)]


def _stage_summary(model):
    return (model.stage.start, model.stage.end, hasattr(model.embed_tokens, "weight"), hasattr(model.norm, "weight"))


def test_killed_stage_is_a_typed_error_naming_it_within_seconds(pp2):
    """Runs last on the module's pp=2 engine: kills the last stage mid-generation."""
    llm, _ = pp2
    pids = llm.collective_rpc("pid")
    caught: dict[str, BaseException] = {}

    def run() -> None:
        try:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 3, SamplingParams(max_tokens=60, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            caught["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    thread.join(10)
    assert not thread.is_alive(), "generate() did not return within 10 s of the kill"
    assert time.monotonic() - started < 10
    error = caught.get("error")
    assert isinstance(error, EngineDeadError), error
    assert f"worker rank 1 (pid {pids[1]}) of pipeline stage 1" in str(error) and "signal 9" in str(error)
    llm.shutdown()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker process survived shutdown"


def test_tp2_pp2_greedy_tokens_match_transformers(models):
    observer = StepObserver()
    registry = Registry.load()
    registry.pm.register(observer)
    with LLM(model=models["llama"], registry=registry, tensor_parallel_size=2, pipeline_parallel_size=2,
             **ENGINE) as llm:
        assert len(llm.collective_rpc("pid")) == 4
        assert run_mixed(llm, observer) == want_tokens(models["llama"])


@pytest.mark.slow
def test_ray_pp2_greedy_tokens_match_transformers(models):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'weavelm[ray]')")
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - any failure to start Ray is a skip with its reason
        pytest.skip(f"Ray could not start here: {e}")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = [hf_greedy(models["qwen3"], p, 4) for p in PROMPTS[:3]]
    llm = LLM(model=models["qwen3"], distributed_executor_backend="ray", pipeline_parallel_size=2,
              **{**ENGINE, "cache": {"num_blocks": 32, "block_size": 4}})
    try:
        assert llm.llm_engine.config.executor.name == "ray"
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params)
        assert [o.outputs[0].token_ids for o in outs] == want
    finally:
        llm.shutdown()


def test_cli_pipeline_parallel_size_flag(smol_tokenizer_model, capsys):
    """`weavelm generate --pipeline-parallel-size 2` (in process: argv through the CLI's parser and config)."""
    from transformers import AutoTokenizer

    from weavelm.cli import main

    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_model)
    ids = tok(prompt)["input_ids"]
    want = tok.decode(hf_greedy(smol_tokenizer_model, ids, 6))
    rc = main(["generate", "--model", smol_tokenizer_model, "--dtype", "float32", "--device", "cpu",
               "--pipeline-parallel-size", "2", "--set", "attention=torch_ref", "--set", "cache.num_blocks=64",
               "--prompt", prompt, "--max-tokens", "6", "--ignore-eos", "-q"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == (prompt + want).strip()


def test_cli_flags_and_yaml_key_set_the_layout():
    import argparse

    from weavelm.cli import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", "m", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"])
    cfg = engine_config_from_args(args)
    assert cfg.executor.name == "multiproc"
    assert (cfg.executor.options.tensor_parallel_size, cfg.executor.options.pipeline_parallel_size) == (2, 2)
    args = parser.parse_args(["--model", "m", "--set", "executor.name=ray",
                              "--set", "executor.pipeline_parallel_size=2"])
    assert engine_config_from_args(args).executor.options.pipeline_parallel_size == 2
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        engine_config_from_args(parser.parse_args(["--model", "m", "--pipeline-parallel-size", "2",
                                                   "--set", "executor.name=uniproc"]))


# -- in one process: the stage split and what each stage reads ----------------------------------------------

def test_each_stage_builds_and_reads_only_its_layers(models):
    from weavelm.core.model_files import LazyTensor
    from weavelm.distributed import TensorParallelGroup
    from weavelm.layers.pipeline import PPMissingLayer, stage_layer_range
    from weavelm.plugins.models.qwen3 import Qwen3ForCausalLM

    assert [stage_layer_range(8, s, 3) for s in range(3)] == [(0, 3), (3, 6), (6, 8)]  # the last stage: fewest
    registry = Registry.load()
    loader_cls = registry.get("loader", "safetensors")
    loader = loader_cls(loader_cls.Options())
    path = models["qwen3"]
    cfg = loader.load_hf_config(path)
    whole = dict(loader.iter_weights(path))
    full = Qwen3ForCausalLM(cfg)
    full.load_weights(whole.items())
    full_params = dict(full.named_parameters())
    for stage, layers in ((0, ("layers.0.", "layers.1.")), (1, ("layers.2.",))):
        model = Qwen3ForCausalLM(cfg, pp=TensorParallelGroup(stage, 2, (0, 1)))
        read: list[str] = []

        def recording(name, t):
            def read_fn(dim, start, length):
                read.append(name)
                return t if dim is None else t.narrow(dim, start, length)
            return LazyTensor(t.shape, t.dtype, read_fn)

        model.load_weights((name, recording(name, t)) for name, t in whole.items())
        mine = [n for n in whole if any(n.startswith("model." + p) for p in layers)]
        extra = ["model.embed_tokens.weight"] + (["model.norm.weight"] if stage == 1 else [])
        assert sorted(read) == sorted(mine + extra), stage
        assert model.attention_layout()[0] == len(layers)
        assert isinstance(model.layers[2 if stage == 0 else 0], PPMissingLayer)
        for name, p in model.named_parameters():
            assert torch.equal(p, full_params[name]), name


def test_an_architecture_without_pipeline_support_is_refused():
    from weavelm.core.model_size import build_model
    from weavelm.distributed import TensorParallelGroup
    from weavelm.plugins.models.moe_decoder import MoeForCausalLM

    with pytest.raises(ConfigError, match="does not support pipeline parallelism"):
        build_model(MoeForCausalLM, object(), TensorParallelGroup(), TensorParallelGroup(0, 2, (0, 1)))


# -- group collectives over gloo sub-groups (4 forked ranks, tp=2 x pp=2) --------------------------------------

def _collectives_rank(rank: int, port: int, results) -> None:
    from weavelm.distributed import ParallelLayout, destroy_distributed, init_parallel

    try:
        torch.set_num_threads(1)
        ctx = init_parallel(ParallelLayout(tensor=2, pipeline=2), rank, f"tcp://127.0.0.1:{port}", "gloo")
        _, pp, tp = ctx.layout.coords(rank)
        summed = ctx.tp.all_reduce(torch.tensor([float(rank)]))  # inside the stage: ranks 2pp and 2pp + 1
        gathered = ctx.tp.all_gather(torch.tensor([float(rank)]))
        shared = ctx.tp.broadcast(torch.tensor([float(rank)]), src=1)
        if pp == 0:  # stage 0 sends two tensors to the same tensor rank of stage 1
            ctx.pp.send(torch.full((2, 3), float(rank)), dst=1)
            t = torch.full((4,), rank + 0.5)
            ctx.pp.isend(t, dst=1).wait()
            got = None
        else:
            a = ctx.pp.recv(torch.empty(2, 3), src=0)
            b = ctx.pp.recv(torch.empty(4), src=0)
            got = (a.unique().tolist(), b.unique().tolist())
        results.put((rank, ctx.tp.ranks, ctx.pp.ranks, summed.item(), gathered.tolist(), shared.item(), got))
        destroy_distributed()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", repr(e)))


def test_group_collectives_over_gloo_subgroups():
    import multiprocessing

    from weavelm.plugins.executors.multiproc import free_port

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_collectives_rank, args=(r, port, results), daemon=True) for r in range(4)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in procs:
            item = results.get(timeout=120)
            got[item[0]] = item
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for rank in range(4):
        assert got[rank][1] != "error", got[rank]
        _, tp_ranks, pp_ranks, summed, gathered, shared, received = got[rank]
        stage, tp = divmod(rank, 2)
        assert tp_ranks == (2 * stage, 2 * stage + 1) and pp_ranks == (tp, tp + 2)
        assert summed == 4 * stage + 1 and gathered == [2 * stage, 2 * stage + 1] and shared == 2 * stage + 1
        if stage == 1:
            assert received == ([float(rank - 2)], [rank - 2 + 0.5])
