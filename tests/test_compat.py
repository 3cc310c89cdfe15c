"""Issue 15, deliverables 6-7: vLLM's flat engine arguments land in their sections, with errors naming the section;
model ids resolve through the local Hugging Face cache only, with distinct messages for each kind of miss."""

import os

import pytest

from weavelm import LLM, ConfigError, LoadError
from weavelm.core.compat import apply_vllm_aliases
from weavelm.core.model_files import resolve_model
from weavelm.core.registry import Registry


@pytest.fixture(scope="module")
def registry():
    return Registry.load()


def test_aliases_map_onto_sections(registry):
    raw = apply_vllm_aliases(dict(model="m", max_num_seqs=64, max_num_batched_tokens=512, gpu_memory_utilization=0.8,
                                  enable_prefix_caching=False, block_size=32, num_gpu_blocks_override=10,
                                  enable_chunked_prefill=False, tensor_parallel_size=1, trust_remote_code=False,
                                  dtype="half", enforce_eager=True, seed=3, max_model_len=99), registry)
    assert raw == {"model": "m", "dtype": "float16", "enforce_eager": True, "seed": 3, "max_model_len": 99,
                   "cache": {"gpu_memory_utilization": 0.8, "block_size": 32, "enable_prefix_caching": False,
                             "num_blocks": 10},
                   "scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": 512, "enable_chunked_prefill": False}}


def test_llm_accepts_vllm_kwargs(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=64, block_size=8,
              enable_prefix_caching=False, num_gpu_blocks_override=40, max_model_len=100, enforce_eager=True,
              seed=5, tensor_parallel_size=1, trust_remote_code=False, gpu_memory_utilization=0.5)
    c = llm.config
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens) == (3, 64)
    assert (c.cache.block_size, c.cache.enable_prefix_caching, c.cache.num_blocks, c.cache.gpu_memory_utilization) \
        == (8, False, 40, 0.5)
    assert (c.max_model_len, c.enforce_eager, c.seed, c.executor.name) == (100, True, 5, "uniproc")
    assert llm.generate([{"prompt_token_ids": [3, 4]}])[0].error is None


def test_alias_overrides_the_config_file_section(tiny_llama):
    llm = LLM(tiny_llama, config={"scheduler": {"name": "priority", "max_num_seqs": 2}}, max_num_seqs=5,
              device="cpu")
    assert (llm.config.scheduler.name, llm.config.scheduler.max_num_seqs) == ("priority", 5)


def test_tensor_parallel_with_uniproc_names_the_section(registry):
    with pytest.raises(ConfigError) as e:
        apply_vllm_aliases({"tensor_parallel_size": 2, "executor": "uniproc"}, registry)
    assert ("executor.tensor_parallel_size: the uniproc executor runs one worker; use executor: "
            "{name: multiproc, tensor_parallel_size: 2}") in str(e.value)
    with pytest.raises(ConfigError, match="executor.tensor_parallel_size: the uniproc executor"):
        apply_vllm_aliases({"tensor_parallel_size": 2}, registry, base={"executor": {"name": "uniproc"}})
    # no executor chosen: vLLM's choice, the multiprocessing one
    assert apply_vllm_aliases({"tensor_parallel_size": 2}, registry)["executor"] == \
        {"name": "multiproc", "tensor_parallel_size": 2}
    assert apply_vllm_aliases({"distributed_executor_backend": "mp", "tensor_parallel_size": 2}, registry
                              )["executor"] == {"name": "multiproc", "tensor_parallel_size": 2}


def test_flat_option_of_a_section_says_where_it_lives(registry, tiny_llama):
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, device="cpu", long_prefill_token_threshold=4, cuda_graph_max_bs=8)
    msg = str(e.value)
    assert "cuda_graph_max_bs: is an option of the model_runner section (paged), not a top-level one" in msg
    assert "model_runner: {cuda_graph_max_bs: 8}" in msg
    with pytest.raises(ConfigError, match="totally_unknown: unknown option"):
        LLM(tiny_llama, device="cpu", totally_unknown=1)


def test_refusals_and_conflicts(registry):
    with pytest.raises(ConfigError, match="trust_remote_code: weavelm never runs code shipped with a model"):
        apply_vllm_aliases({"trust_remote_code": True}, registry)
    with pytest.raises(ConfigError, match=r"max_num_seqs: given as 3 but scheduler.max_num_seqs is 4; give one"):
        apply_vllm_aliases({"max_num_seqs": 3, "scheduler": {"max_num_seqs": 4}}, registry)
    with pytest.raises(ConfigError, match="distributed_executor_backend: 'ray' conflicts with executor.name"):
        apply_vllm_aliases({"distributed_executor_backend": "ray", "executor": "uniproc"}, registry)


def test_alias_values_are_validated_by_the_section(tiny_llama):
    with pytest.raises(ConfigError, match=r"scheduler.max_num_seqs: Input should be greater than or equal to 1"):
        LLM(tiny_llama, device="cpu", max_num_seqs=0)
    with pytest.raises(ConfigError, match=r"cache.gpu_memory_utilization: Input should be less than or equal to 1"):
        LLM(tiny_llama, device="cpu", gpu_memory_utilization=1.5)


# -- model ids -----------------------------------------------------------------------------------------------------
def test_distinct_messages_for_missing_path_empty_folder_and_uncached_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LoadError, match=r"model: '\./nope' does not exist; give a model directory"):
        resolve_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="is an empty folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(LoadError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct' is not a local path and not in the "
                                        r"local Hugging Face cache .*weavelm never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hub_id_resolves_through_the_local_cache(tiny_llama, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--TinyOrg--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (hub / "models--TinyOrg--tiny-llama" / "refs").mkdir()
    (hub / "models--TinyOrg--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    assert os.path.samefile(resolve_model("TinyOrg/tiny-llama"), snapshot)
    llm = LLM("TinyOrg/tiny-llama", dtype="float32", device="cpu")
    assert os.path.samefile(llm.config.model, snapshot)
    assert llm.generate([{"prompt_token_ids": [3, 4]}])[0].error is None
