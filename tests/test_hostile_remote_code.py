"""Hostile probe, round 2, item 3: a model folder whose tokenizer_config.json or config.json has an `auto_map`
naming its own Python file must never get that file run, even when stdin answers "y" to transformers' "run the
custom code?" prompt, and loading must not wait on stdin. Every loading path: the tokenizer (beside the weights or
named by `tokenizer=`), the config, the generation config, the chat template (a template that reaches for Python
objects is stopped by the sandbox)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast, LlamaConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilConfig(LlamaConfig):
    model_type = "evil-remote"
"""

SCRIPT = """
import json, sys
from weavelm import LLM, SamplingParams
from weavelm.errors import WeaveError
kw = dict(dtype="float32", device="cpu", loader="safetensors", cache={"num_blocks": 64})
tok_dir, cfg_dir, tmpl_dir = sys.argv[1:4]
report = {}
llm = LLM(model=tok_dir, **kw)
report["tokenizer"] = llm.get_tokenizer() is None
report["defaults"] = repr(llm.get_default_sampling_params().temperature)
report["generate"] = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
llm.shutdown()
for name, kwargs in [("named_tokenizer", dict(model=tmpl_dir, tokenizer=tok_dir)), ("config", dict(model=cfg_dir))]:
    try:
        LLM(**kwargs, **kw).shutdown()
        report[name] = "loaded"
    except WeaveError as e:
        report[name] = type(e).__name__ + ": " + str(e)[:200]
llm = LLM(model=tmpl_dir, **kw)
try:
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1))
    report["chat"] = "rendered"
except WeaveError as e:
    report["chat"] = type(e).__name__ + ": " + str(e)[:200]
llm.shutdown()
print("REPORT " + json.dumps(report))
"""


def _folder(src: str, dst: str, marker: str, edit_file: str, edit: dict) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "evil.py"), "w") as f:
        f.write(EVIL.format(marker=marker))
    path = os.path.join(dst, edit_file)
    with open(path) as f:
        data = json.load(f)
    data.update(edit)
    with open(path, "w") as f:
        json.dump(data, f)
    return dst


def test_no_code_from_a_model_folder_runs(smol_tokenizer_model, tmp_path):
    marker = str(tmp_path / "MARKER")
    tok_dir = _folder(smol_tokenizer_model, str(tmp_path / "tok"), marker, "tokenizer_config.json",
                      {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    with open(os.path.join(tok_dir, "generation_config.json"), "w") as f:
        json.dump({"temperature": 0.25, "auto_map": {"GenerationConfig": "evil.EvilConfig"}}, f)
    cfg_dir = _folder(smol_tokenizer_model, str(tmp_path / "cfg"), marker, "config.json",
                      {"model_type": "evil-remote", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    escape = ("{{ cycler.__init__.__globals__.os.system('touch " + marker + "') }}"
              "{{ joiner.__init__.__globals__['__builtins__']['open']('" + marker + "', 'w') }}")
    tmpl_dir = _folder(smol_tokenizer_model, str(tmp_path / "tmpl"), marker, "tokenizer_config.json",
                       {"chat_template": escape})
    for leftover in ("chat_template.jinja",):
        if os.path.exists(os.path.join(tmpl_dir, leftover)):
            with open(os.path.join(tmpl_dir, leftover), "w") as f:
                f.write(escape)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tok_dir, cfg_dir, tmpl_dir], input="y\ny\ny\ny\n",
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()})
    took = time.monotonic() - t0
    assert not os.path.exists(marker), "a model folder's code ran"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout, "transformers asked to run the folder's code"
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["tokenizer"] is True  # refused: token-id prompts only
    assert report["defaults"] == "0.25" and len(report["generate"]) == 2
    assert report["named_tokenizer"].startswith("RequestError") and "tokenizer" in report["named_tokenizer"]
    assert report["config"] != "loaded"
    assert report["chat"].startswith("RequestError") and "chat template" in report["chat"]
    assert took < 120, took
