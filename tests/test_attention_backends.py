"""Attention backends: the shipped contract suite (`weavelm.testing.attention`) run against every registered
backend, built-in or installed from outside, plus the Triton kernels' own launch configurations.

The contract classes are made here, one per registered name (`TestContract_<name>`), so a backend is tested the day
its entry point is installed. Without CUDA the Triton kernels run in triton's interpreter (TRITON_INTERPRET=1,
set by the suite's class fixture; here also for the Triton-only tests).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.attention_utils import make_batch, reference_output, rel_err
from weavelm.core.forward import AttentionSpec
from weavelm.testing import component, names
from weavelm.testing.attention import MIXED, AttentionContract, triton_interpreter_without_cuda

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = "weavelm.plugins.attention.triton.kernels"


for _name in names("attention"):
    globals()[f"TestContract_{_name}"] = type(f"TestContract_{_name}", (AttentionContract,),
                                             {"backend": _name, "interpreter_reload": (KERNELS,)})


class TritonCases(AttentionContract):
    backend = "triton"
    interpreter_reload = (KERNELS,)


@pytest.fixture
def triton_cases():
    return TritonCases()


@pytest.fixture(scope="module", autouse=True)
def interpreter_for_triton_tests():
    with triton_interpreter_without_cuda((KERNELS,)):
        yield


@pytest.mark.parametrize("num_splits,window", [(1, None), (2, None), (8, None), (2, 100), (8, 30)])
def test_triton_split_kv_decode(num_splits, window):
    """Split-KV decode; with a window, the splits cover only the window's tiles (some splits get none)."""
    cases = type("Split", (TritonCases,), {"options": {"num_splits": num_splits}})()
    backend = cases.build_backend(4, 1, 64, 16, torch.float32, sliding_window=window)
    b = make_batch([1] * 3, [300, 5, 129], num_heads=4, num_kv_heads=1, head_size=64, block_size=16,
                   device=DEVICE, pad_tokens=2, seed=num_splits)
    meta = backend.make_builder(torch.device(DEVICE)).build(b.meta)
    assert meta.launch_config(1)["num_splits"] == num_splits
    cases.check_against_reference(backend, b, torch.float32, sliding_window=window)


@pytest.mark.parametrize("block_m,tile_n,num_splits,window", [
    (16, 16, 1, None), (64, 16, 4, None), (128, 32, 2, None), (16, 128, 1, None),
    (16, 16, 1, 13), (64, 16, 4, 13), (128, 32, 2, 45), (16, 128, 1, 45)])
def test_triton_kernel_launch_configs(triton_cases, block_m, tile_n, num_splits, window):
    """Any tile shape and split count is correct, on mixed batches too (tiles smaller than a cache block), with
    or without a sliding window (tiles straddling the window's edge)."""
    triton_cases.build_backend(8, 2, 64, 32, torch.float32)
    kernels = importlib.import_module(KERNELS)
    b = make_batch(*MIXED, num_heads=8, num_kv_heads=2, head_size=64, block_size=32, device=DEVICE, seed=tile_n)
    ref, cache = reference_output(b, window)
    n, m = b.meta.num_actual_tokens, b.meta
    out = torch.empty(n, 8, 64, device=DEVICE)
    kernels.paged_attention(b.q.view(n, 8, 64), cache[0], cache[1], out, m.block_table, m.seq_lens,
                            m.query_start_loc, m.num_reqs, b.scale, block_m=block_m, tile_n=tile_n,
                            num_splits=num_splits, sliding_window=window)
    assert rel_err(out.view(n, -1), ref) <= 1e-5


def test_triton_odd_head_size(triton_cases):
    backend = triton_cases.build_backend(6, 2, 80, 16, torch.float32)
    b = make_batch(*MIXED, num_heads=6, num_kv_heads=2, head_size=80, block_size=16, device=DEVICE, seed=3)
    triton_cases.check_against_reference(backend, b, torch.float32)


def test_check_reasons_name_the_problem():
    triton_cls = component("attention", "triton")
    reasons = triton_cls.check(AttentionSpec("cuda", torch.float32, 72, 8, 3, 16))
    assert any("head_size 72" in r for r in reasons)
    assert any("multiple of num_kv_heads" in r for r in reasons)
    flash_cls = component("attention", "flash_attn")
    assert flash_cls.check(AttentionSpec("cpu", torch.bfloat16, 128, 8, 8, 16)) == [
        "device 'cpu': flash-attn kernels need CUDA"]
    if not ON_GPU:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import torch; from weavelm.core.registry import Registry; from weavelm.core.forward import "
                "AttentionSpec; print(Registry.load().get('attention', 'triton').check("
                "AttentionSpec('cpu', torch.float32, 64, 8, 8, 16)))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert "need CUDA (or TRITON_INTERPRET=1" in out.stdout


def test_listing_backends_imports_neither_triton_nor_flash_attn():
    code = ("import sys, weavelm.plugins.attention.triton.backend, weavelm.plugins.attention.flash_attn; "
            "print(sorted(m for m in ('triton', 'flash_attn', 'flash_attn_interface') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
