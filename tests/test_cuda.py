"""The GPU path (skipped without CUDA; tools/gpu_check.sh runs it on a lent machine):
compile + bf16 training learns, matches fp32 eager, and the CLIs work on the device; the step
never waits for the host; the compile preflight works, and its failure is one line."""
import json

import pytest
import torch

import devices
import machinery
import train
from conftest import run_script
from corruption import cosine_alphas_cumprod, umd_loss
from model import build_model, load_checkpoint
from probe import extract_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_compiled_bf16_matches_fp32_eager_and_learns():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    m = build_model("tiny", 4).to(dev)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "adaLN" in n:
                p.normal_(std=0.05)
    net = torch.compile(m, dynamic=False)
    x, t = torch.randn(16, 3, 32, 32, device=dev), torch.randint(0, 1001, (16,), device=dev)
    with torch.autocast("cuda", torch.bfloat16):
        fast = net(x, t).float()
    ref = m(x, t)
    assert ((fast - ref).norm() / ref.norm()).item() < 0.03
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    ac, losses = cosine_alphas_cumprod().to(dev), []
    for _ in range(30):
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = umd_loss(net, x.clamp(-1, 1), r_t0=0.5, mask_ratio=0.375, mask_ratio_t0=0.75, alphas_cumprod=ac,
                               generator=torch.Generator(dev).manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.5 * losses[0]


def test_cli_on_cuda(tmp_path, cifar_dir):
    out = tmp_path / "run"
    r = run_script("train.py", "--data-dir", cifar_dir, "--model", "tiny", "--patch-size", "4", "--batch-size", "32",
                   "--max-steps", "6", "--log-every", "3", "--probe-every", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["compile"] is True and config["amp"] == "bf16"
    assert "probe" in json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    model, ckpt = load_checkpoint(out / "ckpt.pt", "cuda")
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    on_gpu = extract_features(model, images)
    on_cpu = extract_features(load_checkpoint(out / "ckpt.pt", "cpu")[0], images)
    assert ((on_gpu - on_cpu).norm() / on_cpu.norm()).item() < 0.05  # bf16 on the GPU, fp32 on the CPU
    r = run_script("sample.py", "--ckpt", out / "ckpt.pt", "--n", "8", "--steps", "5", "--out", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data-dir", cifar_dir, "--model", "tiny", "--patch-size", "4", "--batch-size", "32",
                   "--max-steps", "4", "--amp", "fp16", "--no-compile", "--probe-every", "0", "--out", tmp_path / "fp16")
    assert r.returncode == 0, r.stderr  # fp16 autocast with the GradScaler
    assert torch.load(tmp_path / "fp16" / "ckpt.pt", weights_only=True)["scaler"] is not None


def test_the_step_never_waits_for_the_host(tmp_path):
    """train.py's step, eager (a compiled graph cannot wait without a graph break, which
    tests/test_compile.py rules out): no synchronisation under torch.cuda.set_sync_debug_mode."""
    r = run_script("tools/bench.py", "--runs", "umd:eager,dit:eager", "--model", "tiny", "--patch-size", "4",
                   "--batch-size", "64", "--steps", "3", "--warmup", "1", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [x["syncs"] for x in runs] == [0, 0], [x["sync_first"] for x in runs]


def test_compile_preflight_works_here_and_a_failure_is_one_line(tmp_path, cifar_dir, monkeypatch, capsys):
    devices.compile_preflight(torch.device("cuda"))  # Triton and a C compiler are here

    def broken(device, backend="inductor"):
        raise machinery.TrainError("torch.compile does not work on this machine (RuntimeError: no Triton); "
                                   "pass --no-compile to train without it")

    monkeypatch.setattr(devices, "compile_preflight", broken)
    with pytest.raises(SystemExit) as e:
        train.main(list(map(str, ["--data-dir", cifar_dir, "--model", "tiny", "--patch-size", "4", "--batch-size", "32",
                                  "--max-steps", "1", "--probe-every", "0", "--compile", "--out", tmp_path / "run"])))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-compile" in err[0], err
