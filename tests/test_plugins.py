"""Plugin discovery through importlib.metadata entry points, failure isolation, and the frozen contract."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

import weavelm
from weavelm.cli import main
from weavelm.core import hookspecs, interfaces
from weavelm.core.registry import Registry

ROOT = os.path.dirname(os.path.dirname(__file__))
BUILTINS = {"scheduler": {"fcfs", "priority"}, "executor": {"uniproc"}, "worker": {"device"},
            "model_runner": {"paged"}, "attention": {"auto", "torch_ref", "triton", "flash_attn", "cpu"},
            "loader": {"auto", "safetensors", "pt", "gguf", "tensorizer", "dummy"}, "model": {"llama", "qwen3"},
            "quantization": {"auto", "none", "int8", "gguf"}}


def fake_distribution(root, dist: str, entry: str, module: str, body: str) -> None:
    """A real installed distribution as importlib.metadata sees it: a dist-info with entry_points.txt."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[weavelm]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


def test_builtins_registered_through_own_entry_points():
    reg = Registry()
    reg.load_entry_points()
    for kind, names in BUILTINS.items():
        assert names <= set(reg.names(kind)), kind
        for n in names:
            assert reg.components[kind][n].distribution == "weavelm"


def test_broken_plugin_is_listed_and_breaks_nothing(tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "weavelm-broken", "broken", "weavelm_broken_mod",
                      "raise ImportError('no such dependency: unicorn')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    rec = reg.plugins["broken"]
    assert rec.distribution == "weavelm-broken" and "unicorn" in rec.error
    assert "fcfs" in reg.names("scheduler")  # everything else still loads
    assert main(["plugins"]) == 0  # a fresh registry: no global state to patch
    out = capsys.readouterr().out
    assert "weavelm-broken" in out and "failed: ImportError: no such dependency: unicorn" in out
    assert "fcfs" in out and "weavelm " in out


def test_selecting_a_broken_plugin_fails_with_its_error(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "weavelm-broken2", "broken_sched", "weavelm_broken2_mod", "1/0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    from weavelm.errors import PluginError

    with pytest.raises(PluginError, match=r"plugin 'broken_sched' from weavelm-broken2 failed to load "
                                          r"\(ZeroDivisionError"):
        reg.get("scheduler", "broken_sched")


def test_name_clash_names_both_distributions(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "weavelm-clash", "clash", "weavelm_clash_mod", """
        from weavelm.core.hookspecs import hookimpl
        from weavelm.plugins.schedulers.fcfs import FCFSScheduler
        class Other(FCFSScheduler):
            pass
        @hookimpl
        def weavelm_register(registry):
            registry.add("scheduler", "fcfs", Other)
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    from weavelm.errors import PluginError

    with pytest.raises(PluginError, match=r"claimed by two distributions \((weavelm-clash and weavelm|weavelm and weavelm-clash)\)"):
        reg.get("scheduler", "fcfs")


def test_example_plugin_installs_and_is_selected_from_yaml(tmp_path, tiny_llama):
    """pip-installs examples/weavelm-plugin-example into a fresh target and selects its scheduler by YAML: with one
    sequence at a time it finishes the shorter prompt first where `fcfs` finishes the earlier one, and both give
    the same greedy tokens (the finishing order is observed through the `weavelm_request_finished` hook)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), os.path.join(ROOT, "examples", "weavelm-plugin-example")],
                   check=True, capture_output=True)
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(f"model: {tiny_llama}\ndevice: cpu\ndtype: float32\nloader: safetensors\n"
                   "scheduler: {name: shortest_prompt, max_num_seqs: 1}\n")
    script = textwrap.dedent(f"""
        import json
        from weavelm import LLM, SamplingParams
        from weavelm.core.registry import Registry
        from weavelm.plugin import hookimpl

        class FinishOrder:
            def __init__(self):
                self.prompt_lens = []
            @hookimpl
            def weavelm_request_finished(self, output):
                self.prompt_lens.append(len(output.prompt_token_ids))

        result = {{}}
        for scheduler in ("shortest_prompt", "fcfs"):
            order, registry = FinishOrder(), Registry.load()
            registry.pm.register(order)
            llm = LLM(config={str(cfg)!r}, registry=registry, scheduler={{"name": scheduler}})
            outs = llm.generate([{{"prompt_token_ids": list(range(1, 30))}}, {{"prompt_token_ids": [5, 6]}}],
                                SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            rec = registry.components["scheduler"][scheduler]
            result[scheduler] = {{"order": order.prompt_lens, "tokens": [o.outputs[0].token_ids for o in outs],
                                 "dist": rec.distribution, "file": __import__(rec.cls.__module__).__file__}}
        print(json.dumps(result))
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), ROOT])}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    example, fcfs = got["shortest_prompt"], got["fcfs"]
    assert example["dist"] == "weavelm-plugin-example" and example["file"].startswith(str(target))
    assert example["order"] == [2, 29] and fcfs["order"] == [29, 2]
    assert example["tokens"] == fcfs["tokens"] and all(len(t) == 4 for t in example["tokens"])


def test_allow_list_env(monkeypatch, tmp_path):
    fake_distribution(tmp_path, "weavelm-extra", "extra", "weavelm_extra_mod", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WEAVELM_PLUGINS", "nothing_else")
    reg = Registry()
    reg.load_entry_points()
    assert "extra" not in reg.plugins and "fcfs" in reg.names("scheduler")


def test_hookspecs_are_frozen():
    specs = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("weavelm_"))
    assert specs == ["weavelm_engine_started", "weavelm_register", "weavelm_request_finished",
                     "weavelm_step_finished"]
    assert interfaces.API_VERSION == "2.5"


def test_public_exports_are_frozen():
    assert sorted(weavelm.__all__) == sorted(["LLM", "LLMEngine", "AsyncLLM", "SamplingParams", "StructuredOutputsParams",
                                              "LoRARequest",
                                              "EngineConfig", "RequestOutput", "CompletionOutput", "WeaveError",
                                              "ConfigError", "PluginError", "LoadError", "RequestError", "EngineError",
                                              "EngineDeadError", "TextPrompt", "TokensPrompt", "EngineArgs",
                                              "__version__"])


def test_event_hooks_reach_an_observer(tiny_llama):
    from weavelm import LLM, SamplingParams
    from weavelm.core.hookspecs import hookimpl
    from weavelm.core.registry import Registry

    seen = {"started": 0, "steps": [], "finished": []}

    class Observer:
        @hookimpl
        def weavelm_engine_started(self, config):
            seen["started"] += 1

        @hookimpl
        def weavelm_step_finished(self, stats):
            seen["steps"].append(stats)

        @hookimpl
        def weavelm_request_finished(self, output):
            seen["finished"].append(output.request_id)

    registry = Registry.load()
    registry.pm.register(Observer())
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", registry=registry)
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert seen["started"] == 1 and len(seen["finished"]) == 2
    assert seen["steps"][0].num_scheduled_tokens == 5 and seen["steps"][0].num_running == 2
