"""The analytic FLOP count against torch's counter, and the bench CLI (its compiled --runs, with
graphs and recompiles counted, are checked by test_gpu_check.py's smoke run of them)."""
import json
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, run_here, run_script
from corruption import random_masking
from model import build_model

sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench import forward_flops, step_flops  # noqa: E402


@pytest.mark.parametrize("size,p,mask_ratio,classes", [("tiny", 8, 0.0, None), ("tiny", 4, 0.75, None),
                                                       ("tiny", 4, 0.375, 10)])
def test_forward_flops_match_torch_counter(size, p, mask_ratio, classes):
    m = build_model(size, p, num_classes=classes)
    B, L = 3, m.num_patches
    ids_keep, _, ids_restore = random_masking(B, L, mask_ratio) if mask_ratio else (None, None, None)
    n_keep = L if ids_keep is None else ids_keep.shape[1]
    y = None if classes is None else torch.zeros(B, dtype=torch.long)
    # the math backend runs attention as bmm, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(torch.randn(B, 3, 32, 32), torch.zeros(B, dtype=torch.long), y, ids_keep, ids_restore)
    assert counter.get_total_flops() == B * forward_flops(size, p, n_keep=n_keep, conditional=classes is not None)


def test_umd_costs_about_0_6x_of_dit():
    umd, umd_tokens = step_flops("small", 2, r_t0=0.5, mask_ratio=0.375, mask_ratio_t0=0.75)
    dit, dit_tokens = step_flops("small", 2, r_t0=0.0, mask_ratio=0.0, mask_ratio_t0=0.75)
    assert (umd_tokens, dit_tokens) == (112, 256)  # (64 + 160) / 2 visible patches per image on average
    assert 0.55 < umd / dit < 0.65
    mae, _ = step_flops("small", 2, r_t0=1.0, mask_ratio=0.0, mask_ratio_t0=0.75)
    assert mae < umd < dit


def test_bench_cli_table_memory_and_mfu(tmp_path):
    r = run_script("tools/bench.py", "--compare", "--model", "tiny", "--patch-size", "4", "--device", "cpu",
                   "--batch-size", "16", "--steps", "1", "--warmup", "0", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith("| ") and not l.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["umd", "mae", "dit", "maskdit"]
    dit = rows[2].split("|")
    assert dit[-2].strip() == "1.00x" and dit[-3].strip() == "1.00x" and float(dit[4]) > 0
    runs = {x["method"]: x for x in json.loads((tmp_path / "b.json").read_text())["runs"]}
    # activations of tiny/4: a few MiB an image in every run (a later run reuses no freed memory
    # unseen), more where the encoder sees more patches
    mib = {m: x["mib_per_img"] for m, x in runs.items()}
    assert all(1 < v < 200 for v in mib.values()) and mib["mae"] < mib["dit"] and mib["umd"] < mib["dit"], mib
    assert all(0 < x["mfu"] < 1.5 for x in runs.values())  # against this CPU's own matmul, at the step's shapes


def test_bench_machine_and_bad_flags(tmp_path):
    r = run_script("tools/bench.py", "--machine", "--device", "cpu", "--backend", "aot_eager", "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["compile"] == "ok" and info["torch"] == torch.__version__ and "c_compiler" in info
    assert info["matmul_gflops_fp32"] > 1 and info["matmul_gflops_bf16"] > 0  # MFU's peak on a CPU
    assert info["default"].startswith("amp bf16, compile True" if info["native_bf16"] else "amp off, compile False")
    for flags in (["--runs", "umd:fast"], ["--steps", "0"]):
        r = run_here("tools/bench.py", *flags, "--device", "cpu")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
