"""Plugin contracts v2: one assembler, per-engine registries, `auto` as a plugin, third-party components through real
entry points, API-version checks, and the structural rules (no plugin imports another; no registry lookups below
the assembler)."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import textwrap
from pathlib import Path

import pytest

from weavelm import LLM, SamplingParams
from weavelm.testing import StepRecorder
from weavelm.core.registry import Registry, RegistrySpec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "weavelm"
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def install_fake_distribution(root: Path, dist: str, entry: str, module: str, body: str) -> None:
    """A real installed distribution as importlib.metadata sees it: dist-info + entry_points.txt + module."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[weavelm]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


LANES_SCHEDULER = """
    from pydantic import BaseModel, ConfigDict, Field
    from weavelm.plugin import BaseScheduler, SchedulerLimits, SchedulerOptions, hookimpl

    WEAVELM_API_VERSION = "2.0"

    class LaneOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lanes: int = Field(300, ge=1)
        tokens_per_step: int = Field(4096, ge=1)

    class LaneScheduler(BaseScheduler):
        name = "lanes"
        description = "FCFS with its own option names (test plugin)."
        Options = LaneOptions

        @classmethod
        def limits(cls, options):
            return SchedulerLimits(options.lanes, options.tokens_per_step)

        def __init__(self, options, context):
            super().__init__(SchedulerOptions(max_num_seqs=options.lanes,
                                              max_num_batched_tokens=options.tokens_per_step), context)
            self.lane_options = options

    @hookimpl
    def weavelm_register(registry):
        registry.add("scheduler", LaneScheduler.name, LaneScheduler)
"""

LOUD_ATTENTION = """
    from weavelm.plugin import AttentionBackend, AttentionImpl, hookimpl, write_kv_cache
    from weavelm.ops.reference_attention import paged_attention_ref

    WEAVELM_API_VERSION = "2.0"

    class LoudImpl(AttentionImpl):
        def forward(self, q, k, v, kv_cache, metadata):
            n = q.shape[0]
            q = q.view(n, self.num_heads, self.head_size)
            write_kv_cache(k.view(n, self.num_kv_heads, self.head_size), v.view(n, self.num_kv_heads, self.head_size),
                           kv_cache, metadata.slot_mapping)
            return paged_attention_ref(q, kv_cache, metadata, self.scale).reshape(n, -1)

    class LoudBackend(AttentionBackend):
        name = "loud"
        description = "The reference math under another name, with the highest priority (test plugin)."
        priority = 1000

        def make_impl(self, num_heads, num_kv_heads, head_size, scale):
            return LoudImpl(num_heads, num_kv_heads, head_size, scale)

    @hookimpl
    def weavelm_register(registry):
        registry.add("attention", LoudBackend.name, LoudBackend)
"""


@pytest.fixture
def outside_plugins(tmp_path, monkeypatch):
    """Two third-party distributions installed (on sys.path) for this test only."""
    install_fake_distribution(tmp_path, "weavelm-lanes", "lanes", "weavelm_lanes_mod", LANES_SCHEDULER)
    install_fake_distribution(tmp_path, "weavelm-loud", "loud", "weavelm_loud_mod", LOUD_ATTENTION)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("WEAVELM_PLUGINS", raising=False)
    return tmp_path


def tiny_engine(path: str, registry: Registry | None = None, **overrides) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", registry=registry, **overrides)


def test_third_party_scheduler_with_its_own_option_names_runs_above_256(tiny_llama, outside_plugins):
    registry = Registry.load()
    assert registry.components["scheduler"]["lanes"].distribution == "weavelm-lanes"
    prompts = [{"prompt_token_ids": [1 + (i * 7) % 250, 2 + i % 100, 3 + i % 50]} for i in range(300)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    recorder = StepRecorder()
    lanes = tiny_engine(tiny_llama, recorder.attach(registry), scheduler={"name": "lanes", "lanes": 300},
                        cache={"num_blocks": 700, "block_size": 4})
    got = lanes.generate(prompts, params)
    assert max(s.num_running for s in recorder.steps) == 300  # the runner's batch took the scheduler's limits
    assert lanes.get_stats().num_used_blocks == 0
    fcfs = tiny_engine(tiny_llama, Registry.load(), scheduler={"name": "fcfs", "max_num_seqs": 300},
                       cache={"num_blocks": 700, "block_size": 4})
    want = fcfs.generate(prompts, params)
    assert all(g.error is None for g in got)
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]


def test_highest_priority_outside_backend_wins_auto(tiny_llama, outside_plugins, caplog):
    with caplog.at_level(logging.INFO, logger="weavelm.attention"):
        loud = tiny_engine(tiny_llama)  # attention: auto
    assert loud.collective_rpc("model_info")[0]["attention"] == "loud"
    assert "auto picked loud" in caplog.text
    ref = tiny_engine(tiny_llama, attention="torch_ref")
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    assert [o.outputs[0].token_ids for o in loud.generate(prompts, GREEDY)] == \
        [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)]


def test_two_engines_with_different_registries_coexist(tiny_llama, outside_plugins):
    everything = Registry.load()
    blocked = Registry.load(RegistrySpec(allow=("lanes",)))  # the loud backend is not allowed here
    assert "loud" in everything.names("attention") and "loud" not in blocked.names("attention")
    a = tiny_engine(tiny_llama, everything)
    b = tiny_engine(tiny_llama, blocked)
    assert a.collective_rpc("model_info")[0]["attention"] == "loud"
    assert b.collective_rpc("model_info")[0]["attention"] == "cpu"
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    out_a, out_b = a.generate(prompts, GREEDY), b.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in out_a] == [o.outputs[0].token_ids for o in out_b]


def test_incompatible_api_major_is_refused_naming_the_distribution(tmp_path, monkeypatch, capsys):
    install_fake_distribution(tmp_path, "weavelm-old", "old_sched", "weavelm_old_mod", """
        from weavelm.plugin import hookimpl
        WEAVELM_API_VERSION = "1.1"
        @hookimpl
        def weavelm_register(registry):
            raise AssertionError("never registered")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.load()
    record = registry.plugins["old_sched"]
    assert "weavelm-old" in record.error and "API 1.1" in record.error and "2.5" in record.error
    from weavelm.cli import main
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "old_sched" in out and "failed" in out and "weavelm-old" in out


def test_registration_is_a_historic_hook_and_registries_are_independent():
    first, second = Registry.load(), Registry.load()
    assert first.pm.hook.weavelm_register.spec.opts["historic"]
    assert first.pm is not second.pm and first.components["scheduler"]["fcfs"].cls is \
        second.components["scheduler"]["fcfs"].cls


def test_worker_builder_pickles_and_rebuilds_its_registry(tiny_llama):
    from weavelm.core.assembly import Assembly, WorkerBuilder
    from weavelm.core.config import EngineConfig

    registry = Registry.load()
    config = EngineConfig.build({"model": tiny_llama, "dtype": "float32", "device": "cpu"}, registry)
    builder = WorkerBuilder(config, registry.spec, registry, Assembly(config, registry).limits)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone.spec == registry.spec and clone.registry is not registry  # rebuilt from entry points
    assert sorted(clone.registry.names("scheduler")) == sorted(registry.names("scheduler"))
    worker = clone(0, 1)  # rebuilt registry, same config
    assert type(worker).name == "device" and worker.rank == 0


def test_lora_section_selects_a_lora_manager_plugin(tiny_llama):
    from weavelm.errors import ConfigError
    with pytest.raises(ConfigError, match="lora.name: .*lora_manager"):
        tiny_engine(tiny_llama, lora={"name": "no-such-manager", "max_loras": 2})
    llm = tiny_engine(tiny_llama, lora={"max_loras": 2})
    assert llm.config.lora.name == "punica"
    out = llm.generate([[5, 6, 7]], GREEDY)[0]
    assert out.error is None and llm.get_stats().num_active_loras == 0


def test_collective_rpc_reaches_the_worker(tiny_llama):
    llm = tiny_engine(tiny_llama)
    [info] = llm.collective_rpc("model_info")
    assert info["attention"] == "cpu" and info["device"] == "cpu"


# -- structure ------------------------------------------------------------------------------------------------

def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _plugin_group(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["weavelm", "plugins"] else None


def test_no_plugin_module_imports_another_plugin():
    """A module under weavelm/plugins/<group>/ imports nothing from another group, and no entry-point module
    imports another entry-point module (shared code lives in weavelm/ops, weavelm/scheduling, core)."""
    import importlib.metadata as md

    entry_modules = {ep.value.split(":")[0] for ep in md.entry_points(group="weavelm")
                     if ep.dist is not None and ep.dist.name == "weavelm"}
    offences = []
    for path in (PACKAGE / "plugins").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        group = _plugin_group(module)
        for imported in _imports(path):
            other = _plugin_group(imported)
            if other is not None and other != group:
                offences.append(f"{module} imports {imported} (plugin group {other!r})")
            if module in entry_modules and imported in entry_modules and imported != module:
                offences.append(f"{module} imports the plugin module {imported}")
    kernel = [*(PACKAGE / "core").rglob("*.py"), *(PACKAGE / "ops").rglob("*.py"), *(PACKAGE / "testing").rglob("*.py"),
              PACKAGE / "scheduling.py", PACKAGE / "plugin.py", PACKAGE / "utils.py"]
    for path in kernel:  # the kernel, the SDK and the test kit import no plugin (tools like convert may)
        bad = [i for i in _imports(path) if _plugin_group(i) is not None]
        if bad:
            offences.append(f"{path.relative_to(ROOT)} imports {bad}")
    assert not offences, "\n".join(offences)


def test_registry_is_looked_up_only_by_the_assembler_and_entry_points():
    """No `get_registry()` anywhere; building a registry only in the assembler, the frontend that owns an engine,
    config validation, the CLI, convert, the test kit, the engine-core process (which rebuilds its engine's
    registry from the spec the frontend sends) and the `serve --api-server-count` supervisor (which starts that
    process); plugins never call `registry.get`/`find_model`."""
    allowed = {"core/registry.py", "core/assembly.py", "core/llm_engine.py", "core/llm.py", "core/config.py", "cli.py",
               "convert.py", "testing/_registry.py", "testing/stats.py", "testing/executor.py", "core/engine_proc.py",
               "serve/multi.py", "tools/settings.py", "testing/multimodal.py"}  # tools: the parser flags are checked before the engine loads
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        assert "get_registry(" not in text, rel
        if any(tok in text for tok in ("Registry.load(", "Registry.from_spec(", "Registry()")):
            assert rel in allowed, f"{rel} builds a registry"
        if rel.startswith("plugins/"):
            for call in ("registry.get(", "registry.find_model(", "registry.classes(", "registry.names("):
                assert call not in text, f"{rel} looks up components itself ({call})"


def test_shared_ops_do_not_import_plugins():
    for path in (PACKAGE / "ops").rglob("*.py"):
        assert not [i for i in _imports(path) if i.startswith("weavelm.plugins")], path


def test_one_ceiling_division():
    offenders = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                 if "-(-" in p.read_text() and p.name != "utils.py"]
    assert not offenders, f"use weavelm.utils.cdiv in {offenders}"


def test_plugin_facade_exports_the_contract():
    import weavelm.plugin as sdk

    for name in ("hookimpl", "API_VERSION", "Scheduler", "BaseScheduler", "SchedulerLimits", "Executor", "Worker",
                 "ModelRunner", "ModelLoader", "AttentionBackend", "AttentionImpl", "AttentionSpec",
                 "SchedulerOutput", "ModelRunnerOutput", "RunnerContext", "WorkerContext", "ExecutorContext"):
        assert hasattr(sdk, name), name
    assert sorted(sdk.__all__) == sorted(set(sdk.__all__))
    assert os.path.exists(PACKAGE / "plugin.py")
