"""Issue 29, item 5: vLLM's own offline examples (tests/ported_vllm_examples/, only the import changed) run in a
subprocess. The hub ids they name resolve through a Hugging Face cache made here (HF_HUB_CACHE), holding a tiny
random llama with SmolLM2's real tokenizer and chat template, so the scripts stay as vLLM wrote them."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "tests", "ported_vllm_examples")
HUB_IDS = ("facebook/opt-125m", "meta-llama/Llama-3.2-1B-Instruct")
DRIVER = """
import runpy, sys
for script, *argv in {runs!r}:
    sys.argv = [script, *argv]
    print("=== RUN", script, flush=True)
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def hub_cache(smol_tokenizer_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    for repo in HUB_IDS:
        folder = cache / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        shutil.copytree(smol_tokenizer_model, folder / "snapshots" / ("0" * 40))
    return str(cache)


def test_vllm_offline_examples_run_with_only_the_import_changed(hub_cache):
    for name in ("basic.py", "generate.py", "chat.py"):
        with open(os.path.join(EXAMPLES, name)) as f:
            text = f.read()
        assert "vllm import" not in text.replace("`from vllm import`", "")
    runs = [(os.path.join(EXAMPLES, "basic.py"),),
            (os.path.join(EXAMPLES, "generate.py"), "--max-tokens", "8", "--max_num_seqs", "4", "--enforce-eager"),
            (os.path.join(EXAMPLES, "chat.py"), "--max-tokens", "8", "--temperature", "0"),
            (os.path.join(EXAMPLES, "logprobs.py"),)]
    env = {**os.environ, "HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(runs=runs)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert out.count("=== RUN") == 4
    assert out.count("Prompt:    'The capital of France is'") == 1  # basic.py
    assert out.count("Prompt: 'The future of AI is'\nGenerated text: ") == 1  # generate.py
    assert out.count("Generated text: ") == 4 + 1 + 10 + 2  # generate, chat (1 + 10 conversations), logprobs
    assert "<|im_start|>user\\nHello<|im_end|>" in out  # chat.py rendered SmolLM2's ChatML template
    assert out.count("Cumulative logprob: -") == 2 and "(rank " in out and "Engine: LLMEngine" in out
    assert "Processed prompts: 100%" in err  # the tqdm bars generate() shows by default
