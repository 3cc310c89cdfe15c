"""Issue 29, item 7: the extras, and a clear message (no traceback) naming the extra when it is missing. Missing
packages are simulated in a subprocess whose import system cannot find them (as if not installed)."""

import filecmp
import json
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDE = """
import importlib.machinery, sys
HIDDEN = {hidden!r}
class Hide:  # PathFinder, except that HIDDEN packages are not found
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()
sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def run_hidden(hidden: list[str], code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE.format(hidden=set(hidden)) + code], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_extras_and_dev_holds_them_all():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert {"serve", "gguf", "ray", "structured", "vision", "dev"} <= set(extras)
    assert extras["structured"] == ["xgrammar>=0.1.21"] and extras["vision"] == ["pillow>=10"]
    assert not any(r.startswith("accelerate") for r in extras["gguf"])  # the default model runs without it
    for name, reqs in extras.items():
        assert set(reqs) <= set(extras["dev"]), name


def test_generate_without_gguf_names_the_extra_without_a_traceback():
    proc = run_hidden(["gguf"], "import runpy, sys; sys.argv = ['weavelm', 'generate', '--prompt', 'hi']; "
                                "runpy.run_module('weavelm.cli', run_name='__main__')")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: the default model (SmolLM2-135M-Instruct, a GGUF file) needs the `gguf` "
                                   "package, which is not installed; install it with pip install 'weavelm[gguf]'")


def test_default_model_files_need_only_the_gguf_extra(tmp_path):
    """The default model's tokenizer and generation config come from the GGUF's metadata with `accelerate` absent
    (transformers' GGUF weight conversion needs it; the engine reads the GGUF weights itself)."""
    from weavelm.default_model import default_model_path

    code = ("from weavelm.default_model import default_gguf_file, write_gguf_tokenizer_files; "
            f"write_gguf_tokenizer_files(default_gguf_file(), {str(tmp_path)!r})")
    proc = run_hidden(["accelerate"], code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert filecmp.cmp(os.path.join(ref, name), tmp_path / name, shallow=False), name
    with open(tmp_path / "generation_config.json") as f:
        made = json.load(f)
    assert (made["bos_token_id"], made["eos_token_id"], made["pad_token_id"]) == (1, 2, 2)  # SmolLM2's


def test_a_gguf_model_without_gguf_names_the_extra():
    from weavelm.default_model import default_gguf_file

    path = default_gguf_file()
    proc = run_hidden(["gguf"], "import runpy, sys; sys.argv = ['weavelm', 'generate', '--model', "
                                f"{path!r}, '--prompt', 'hi']; runpy.run_module('weavelm.cli', run_name='__main__')")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith(f"error: loading {os.path.basename(path)} (a GGUF file) needs the `gguf` "
                                        f"package, which is not installed; install it with pip install "
                                        f"'weavelm[gguf]'")
