"""train.py end to end: files, exact resume, Ctrl-C, errors, DDP under torchrun, recipes."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import train
from conftest import ROOT, TINY, one_error_line, train_here, torchrun
from model import load_checkpoint

def log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def test_cli_smoke_writes_run_files(tiny_run):
    ckpt = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8 and abs(ckpt["epoch"] - 8 / 6) < 1e-9  # 200 images / batch 32 = 6 steps per epoch
    assert set(ckpt) >= {"model", "ema", "optimizer", "step", "epoch", "config"}
    assert (tiny_run / "reconstruction.png").exists()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["method"] == "umd" and config["r_t0"] == 0.5 and config["mask_ratio"] == 0.375
    assert config["lr"] == 1e-3 and config["recipe"] == "cpu" and config["weight_decay"] == 0.05
    records = log(tiny_run)
    assert [r["step"] for r in records] == [4, 8]
    for r in records:
        assert {"step", "epoch", "loss", "loss_t0", "loss_t", "lr", "img_per_s"} <= set(r)
        assert math.isclose(r["loss"], 0.5 * r["loss_t0"] + 0.5 * r["loss_t"], rel_tol=1e-5)
    model, _ = load_checkpoint(tiny_run / "ckpt.pt")
    assert model.config["size"] == "tiny" and model.num_classes is None


def test_resume_is_exact(cifar_dir, tmp_path):
    a, moved, b = tmp_path / "a", tmp_path / "first", tmp_path / "b"
    train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 7, "--out", a)
    train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 3, "--out", moved)
    moved.rename(b)  # a run resumes where --out says, even after it was moved
    with open(b / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line half-written by a crash is dropped
    train_here("--data-dir", cifar_dir, "--resume", "--out", b, "--max-steps", 7)
    assert not moved.exists()
    la, lb = log(a), log(b)
    assert [r["step"] for r in lb] == list(range(1, 8))
    for ra, rb in zip(la, lb):  # identical losses after the resume, across an epoch boundary (6 steps)
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra, rb)
    ca, cb = torch.load(a / "ckpt.pt", weights_only=True), torch.load(b / "ckpt.pt", weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]) and torch.equal(ca["ema"][k], cb["ema"][k])


def test_ctrl_c_saves_a_resumable_checkpoint(cifar_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data-dir", str(cifar_dir), *TINY, "--epochs", "1000", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 3):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 3 and ckpt["step"] == log(out)[-1]["step"]
    assert not list(out.glob("*.tmp"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.umd_loss

    def poisoned(*a, **k):
        loss, stats = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 5 else (loss, stats)

    monkeypatch.setattr(train, "umd_loss", poisoned)
    out = tmp_path / "nan"
    r = train_here("--data-dir", cifar_dir, *TINY, "--log-every", 2, "--ckpt-minutes", 0,
                   "--out", out, want=2)
    assert "non-finite at step 5" in one_error_line(r, "train.py")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("argv,message", [
    (["--resume", "--out", "{tmp}/none"], "no checkpoint"),
    (["--data-dir", "{tmp}/empty", "--out", "{tmp}/x"], "download"),
    (["--finetune", "{tmp}/missing.pt", "--out", "{tmp}/x"], "no such file"),
    (["--r-t0", "0.5", "--mask-ratio-t0", "0", "--out", "{tmp}/x"], "mask-ratio-t0"),
    (["--device", "cpu", "--amp", "fp16", "--out", "{tmp}/x"], "fp16"),
    (["--patch-size", "3", "--out", "{tmp}/x"], "--patch-size 3"),
    (["--max-steps", "0", "--out", "{tmp}/x"], "--max-steps"),
    (["--lr", "nan", "--out", "{tmp}/x"], "--lr nan is not a finite number"),
    (["--epochs", "inf", "--out", "{tmp}/x"], "--epochs inf is not a finite number"),
    (["--ema-decay", "1.5", "--out", "{tmp}/x"], "--ema-decay"),
    (["--beta2", "1.0", "--out", "{tmp}/x"], "--beta2"),
    (["--grad-clip", "0", "--out", "{tmp}/x"], "--grad-clip"),
    (["--mask-ratio", "0.99", "--out", "{tmp}/x"], "--mask-ratio 0.99 keeps 0 of 64 patches"),
    (["--probe-every", "-1", "--out", "{tmp}/x"], "--probe-every and --ckpt-minutes"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch):
    monkeypatch.setattr("data.CIFAR_URL", "http://127.0.0.1:9/cifar.tar.gz")
    r = train_here(*[a.format(tmp=tmp_path) for a in argv], want=2)
    err = r.stderr.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_resume_takes_unset_flags_from_the_saved_run(cifar_dir, tmp_path):
    out = tmp_path / "run"
    train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 2, "--out", out)
    # no --data-dir: the run's own (cifar_dir), not ./data; no --max-steps: to the end of the schedule
    args = config.resolve(config.get_args(["--resume", "--out", str(out), "--max-steps", "3"]))
    assert args.data_dir == str(cifar_dir) and args.max_steps == 3 and args.lr == 1e-3 and args.model == "tiny"
    assert config.resolve(config.get_args(["--resume", "--out", str(out)])).max_steps is None
    r = train_here("--resume", "--out", out, "--lr", "0.1", want=2)  # a setting can't change mid-run
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "--lr cannot change on --resume" in err


def test_second_ctrl_c_aborts_in_one_line_and_keeps_the_checkpoint(cifar_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.umd_loss

    def interrupted(*a, **k):  # the second Ctrl-C arrives in the middle of step 5
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "umd_loss", interrupted)
    out = tmp_path / "abort"
    r = train_here("--data-dir", cifar_dir, *TINY, "--log-every", 2, "--ckpt-minutes", 0,
                   "--out", out, want=130)
    err = [l for l in r.stderr.splitlines() if "train.py" in l]
    assert len(err) == 1 and "aborted at step 4" in err[0] and "(step 4) is kept" in err[0], err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def test_unknown_method_and_existing_run(tiny_run):
    r = train_here("--method", "vae", want=2)
    assert "invalid choice" in r.stderr
    r = train_here("--out", tiny_run, want=2)
    assert "--resume" in r.stderr


def resolve(*argv):
    return config.resolve(config.get_args([str(a) for a in argv]))


def test_method_presets_and_finetune_recipe(tiny_run):
    for method, (r, m0, m) in {"umd": (0.5, 0.75, 0.375), "mae": (1.0, 0.75, 0.0), "dit": (0.0, 0.75, 0.0),
                               "maskdit": (0.0, 0.75, 0.5)}.items():
        a = resolve("--method", method, "--recipe", "gpu", "--out", "/nonexistent/x")
        assert (a.r_t0, a.mask_ratio_t0, a.mask_ratio) == (r, m0, m)
        assert a.epochs == 800 and a.batch_size == 1024 and a.warmup == 0.05 and a.model == "small"
        assert a.ema_decay == 0.9999 and a.ema_warmup
    a = resolve("--method", "dit", "--mask-ratio", "0.25", "--recipe", "gpu", "--out", "/nonexistent/x")
    assert a.mask_ratio == 0.25  # flags beat presets
    ft = resolve("--finetune", tiny_run / "ckpt.pt", "--recipe", "gpu")
    assert (ft.method, ft.model, ft.patch_size, ft.r_t0, ft.mask_ratio) == ("umd", "tiny", 8, 0.05, 0.0)
    assert (ft.lr, ft.beta2, ft.weight_decay, ft.epochs, ft.warmup, ft.batch_size) == (1.5e-4, 0.999, 0.0, 50, 0.04, 256)
    assert ft.label_dropout == 0.1 and ft.min_area == 0.95 and ft.out.endswith("umd-tiny-p8-ft")
    # the official fine-tune EMA: step size 1e-4 per 256 images, no warm-up
    assert ft.ema_decay == pytest.approx(0.9999) and not ft.ema_warmup
    assert resolve("--finetune", tiny_run / "ckpt.pt", "--recipe", "gpu", "--batch-size", 1024).ema_decay == pytest.approx(0.9996)


def test_default_recipe_follows_the_device_only(tiny_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = resolve("--out", "/nonexistent/x")  # no CUDA: the CPU recipe
    assert (a.recipe, a.model, a.patch_size, a.batch_size, a.epochs, a.lr) == ("cpu", "tiny", 4, 128, 2.5, 1e-3)
    a = resolve("--epochs", 1, "--out", "/nonexistent/x")  # a schedule flag keeps the CPU recipe
    assert (a.recipe, a.model, a.batch_size, a.epochs) == ("cpu", "tiny", 128, 1)
    assert resolve("--model", "small", "--out", "/nonexistent/x").batch_size == 128
    assert resolve("--recipe", "gpu", "--out", "/nonexistent/x").epochs == 800
    ft = resolve("--finetune", tiny_run / "ckpt.pt", "--out", "/nonexistent/x")
    assert (ft.recipe, ft.epochs, ft.batch_size, ft.ema_decay) == ("cpu", 0.6, 128, 0.99)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("--out", "/nonexistent/x").recipe == "gpu"
    assert resolve("--epochs", 1, "--out", "/nonexistent/x").batch_size == 1024
    assert resolve("--device", "cpu", "--out", "/nonexistent/x").recipe == "cpu"


def test_first_line_says_which_recipe_runs_on_the_cpu(cifar_dir, tmp_path):
    common = ["--data-dir", cifar_dir, "--device", "cpu", "--probe-every", "0", "--max-steps", 1]
    r = train_here(*common, "--batch-size", 32, "--out", tmp_path / "a")
    assert r.stdout.splitlines()[0].startswith("on the CPU: the CPU recipe fills every flag not given")
    assert "tiny/p4" in r.stdout.splitlines()[1] and "batch 32" in r.stdout.splitlines()[1]


def test_help_shows_every_recipe_value(capsys):
    with pytest.raises(SystemExit):
        config.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(gpu 800; cpu 2.5; finetune-gpu 50; finetune-cpu 0.6)" in text
    assert "(gpu 1024; cpu 128; finetune-gpu 256; finetune-cpu 128)" in text


def test_lr_schedule():
    peak = 1e-3
    assert train.lr_at(0, 100, 10, peak) == pytest.approx(1e-4)
    assert train.lr_at(9, 100, 10, peak) == pytest.approx(peak)
    assert train.lr_at(55, 100, 10, peak) == pytest.approx(peak / 2)
    assert train.lr_at(100, 100, 10, peak) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("flags", [
    ["--method", "umd"],
    ["--method", "dit"],  # the mask token gets no gradient on any rank
    # one noise-free image in the batch: one rank runs two forwards, the other one, and only the
    # first uses the mask token (it cannot split over micro-batches: no --grad-accum twin)
    ["--finetune", "{tiny_run}"],
    ["--finetune", "{tiny_run}", "--batch-size", "40"],  # 2 noise-free images: one per rank
], ids=["umd", "dit", "finetune", "finetune-even"])
def test_two_process_gloo_run_under_torchrun_and_its_grad_accum_twin(cifar_dir, tiny_run, tmp_path, flags):
    out = tmp_path / "ddp"
    flags = [str(tiny_run / "ckpt.pt") if f == "{tiny_run}" else f for f in flags]
    tiny = TINY if flags[0] != "--finetune" else TINY[4:]  # a fine-tune keeps the checkpoint's network
    common = ["--data-dir", cifar_dir, *tiny, *flags, "--max-steps", 3]
    r = torchrun("train.py", *common, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [rec["step"] for rec in log(out)] == [1, 2, 3]  # one log, written by rank 0 only
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    if flags[1:] == [] or flags[-1] != str(tiny_run / "ckpt.pt"):
        # one process, --grad-accum 2: micro-batch i is rank i, so the same losses and weights
        train_here(*common, "--grad-accum", 2, "--out", tmp_path / "accum")
        assert json.loads((tmp_path / "accum" / "config.json").read_text())["grad_accum"] == 2
        for a, b in zip(log(out), log(tmp_path / "accum"), strict=True):
            for k in ("loss", "loss_t0", "loss_t"):
                assert math.isclose(a.get(k, 0), b.get(k, 0), rel_tol=1e-5), (k, a, b)
        one = torch.load(tmp_path / "accum" / "ckpt.pt", weights_only=True)
        for k, v in ckpt["model"].items():
            assert torch.allclose(one["model"][k], v, rtol=1e-4, atol=1e-6), k


def test_grad_accum_resumes_exactly_and_takes_over_after_out_of_memory(cifar_dir, tmp_path, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    accum = ["--grad-accum", 2]
    train_here("--data-dir", cifar_dir, *TINY, *accum, "--max-steps", 6, "--out", a)
    train_here("--data-dir", cifar_dir, *TINY, *accum, "--max-steps", 3, "--out", b)
    train_here("--data-dir", cifar_dir, "--resume", "--out", b, "--max-steps", 6)
    assert [r["loss"] for r in log(a)] == [r["loss"] for r in log(b)]  # exact, with the saved N
    assert json.loads((b / "config.json").read_text())["grad_accum"] == 2
    # out of memory at step 5 (4 saved): one line that says how to go on, then it goes on
    calls, real = {"n": 0}, train.umd_loss

    def out_of_memory(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(train, "umd_loss", out_of_memory)
    r = train_here("--data-dir", cifar_dir, *TINY, "--log-every", 2, "--ckpt-minutes", 0,
                   "--out", c, want=2)
    line = one_error_line(r, "train.py")
    assert "out of memory on the CPU with micro-batches of 32 images" in line
    assert f"--resume --out {c} --grad-accum 2" in line and "(step 4) is kept" in line
    assert torch.load(c / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "umd_loss", real)
    train_here("--data-dir", cifar_dir, "--resume", "--out", c, *accum, "--max-steps", 6)
    assert [r["step"] for r in log(c)] == [2, 4, 6]
    assert json.loads((c / "config.json").read_text())["grad_accum"] == 2


def test_ddp_with_grad_accum_averages_gradients_once_per_step(tmp_path):
    import contextlib
    import torch.distributed as dist
    import devices
    from corruption import cosine_alphas_cumprod, umd_loss
    from model import UMDModel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = devices.wrap(UMDModel("tiny", 8), torch.device("cpu"), 2, False, False)  # DDP
        calls = []

        def counting(state, bucket):  # DDP's all-reduce of one gradient bucket
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        net.register_comm_hook(None, counting)
        x0, ac = torch.rand(8, 3, 32, 32) * 2 - 1, cosine_alphas_cumprod()

        def step(sync):  # all-reduce calls after each micro-batch's backward
            seen = []
            for part in devices.micro_batches(8, 0.5, 0, 1, 2):
                with sync(part.last):
                    loss, _ = umd_loss(net, x0[4 * part.rank:][:4], r_t0=0.5, n0=part.n0, mask_ratio=0.375,
                                       mask_ratio_t0=0.75, alphas_cumprod=ac)
                    loss.backward()
                seen.append(len(calls))
            return seen

        for _ in range(2):  # DDP rebuilds its buckets after the first step: look at both
            before = len(calls)
            first, last = step(lambda last: devices.sync_grads(net, last))
            assert first == before and last > before  # only the last micro-batch all-reduces
        first, _ = step(lambda last: contextlib.nullcontext())  # the control: every micro-batch does
        assert first > last
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "3"], "the batch of 32 (16 noise-free) does not split into 3 equal micro-batches"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--r-t0", "0.05", "--grad-accum", "2"], "the batch of 32 (1 noise-free) does not split"),
])
def test_micro_batches_that_cannot_be_equal_are_one_line(cifar_dir, tmp_path, flags, message):
    r = train_here("--data-dir", cifar_dir, *TINY, *flags, "--out", tmp_path / "x", want=2)
    err = r.stderr
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x" / "ckpt.pt").exists()
