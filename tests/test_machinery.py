"""What a run can count on at its edges (machinery.py and the scripts' front doors): outputs
checked before the work, atomic files, one run per folder, one-line errors for OS errors and bad
numbers, Ctrl-C in one line, resume only on the same data, probes that say what data they need."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import machinery
from conftest import ROOT, TINY, one_error_line, run_here, run_script, train_here, write_cifar
from devices import noise_free_share
from machinery import claim, read_log, save_atomic

@pytest.mark.parametrize("native,amp,compile_,want", [
    (True, None, None, ("bf16", True, "a CPU with native bf16")),
    (False, None, None, ("off", False, "a CPU without native bf16")),
    (True, "off", False, ("off", False, "a CPU with native bf16; --amp and --compile given")),
    (False, "bf16", None, ("bf16", False, "a CPU without native bf16; --amp given")),
])
def test_precision_follows_the_cpu_and_the_flags(monkeypatch, native, amp, compile_, want):
    import devices
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert devices.precision(torch.device("cpu"), amp, compile_) == want


def test_train_says_what_precision_it_chose_and_why(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    r = train_here("--data-dir", cifar_dir, *TINY, "--no-compile", "--max-steps", 1,
                   "--out", tmp_path / "r")
    assert "amp bf16, compile False (a CPU with native bf16; --compile given)" in r.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["amp"] == "bf16" and saved["compile"] is False


def test_noise_free_share_of_the_global_batch():
    for batch, r_t0, world in [(1024, 0.5, 8), (256, 0.05, 8), (256, 0.05, 16), (32, 0.25, 3)]:
        shares = [noise_free_share(batch, r_t0, rank, world) for rank in range(world)]
        assert sum(shares) == int(batch * r_t0) and max(shares) - min(shares) <= 1


# ----------------------------------------------------------------------------- files
def full_disk(monkeypatch, after=0):
    """Checkpoint files fail halfway with ENOSPC, after `after` that are written whole."""
    real_open, calls = open, {"n": 0}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "ckpt.pt" in str(path) and "w" in mode:
            calls["n"] += 1
            return Full(f) if calls["n"] > after else f
        return f

    monkeypatch.setattr(machinery, "open", fake_open, raising=False)


@pytest.fixture
def small_disk(tmp_path):
    """A real 130 MB file system (a tmpfs), where the machine allows mounting one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=130m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1}, path)
    full_disk(monkeypatch)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_run_stopped_by_a_full_disk_says_so_and_resumes_once_there_is_room(
        cifar_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk(monkeypatch, after=1)  # the first checkpoint is written, the second one is not
    argv = ["--data-dir", cifar_dir, *TINY, "--log-every", 2, "--ckpt-minutes", 0, "--out", out]
    r = train_here(*argv, "--max-steps", 6, want=2)
    line = one_error_line(r, "train.py")
    assert "No space left on device" in line and "--resume" in line
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    train_here("--resume", "--out", out, "--max-steps", 6)
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [2, 4, 6]


def test_a_real_full_disk_is_one_line_and_the_run_resumes_after_it(
        small_disk, cifar_dir):
    out = small_disk / "run"  # one checkpoint of this network is 91 MB: the second cannot fit
    argv = ["--data-dir", cifar_dir, *TINY, "--log-every", 2, "--ckpt-minutes", 0, "--out", out]
    r = train_here(*argv, "--max-steps", 4, want=2)
    assert "No space left on device" in one_error_line(r, "train.py")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert not list(out.glob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)
    train_here("--resume", "--out", out, "--max-steps", 4)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_impossible_out_is_one_line_before_any_work(where, cifar_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "run"
    r = train_here("--data-dir", cifar_dir, *TINY, "--out", out, want=2)
    assert str(tmp_path / "f") in one_error_line(r, "train.py")


def test_one_run_per_folder_and_a_crashed_run_does_not_hold_it(cifar_dir, tmp_path):
    out = tmp_path / "run"
    held = claim(out)
    r = train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 1, "--out", out, want=2)
    assert "in use by another run" in one_error_line(r, "train.py")
    assert not (out / "ckpt.pt").exists() and not (out / "config.json").exists()
    held.close()
    # a process that holds the folder and dies by kill -9 leaves no stale lock
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import machinery; " \
           f"lock = machinery.claim({str(out)!r}); print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(machinery.TrainError):
        claim(out)
    p.kill()
    p.wait()
    claim(out).close()


def test_a_damaged_log_line_is_skipped_on_resume(cifar_dir, tmp_path):
    out = tmp_path / "run"
    train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 2, "--out", out)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'\xff\xfe binary\n[1, 2]\n"text"\n')
    train_here("--resume", "--out", out, "--max-steps", 3)
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]


def test_resume_refuses_other_data_before_changing_anything(cifar_dir, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    train_here("--data-dir", cifar_dir, *TINY, "--max-steps", 2, "--out", out)
    write_cifar(other, n_per_batch=48)  # the same classes, more images: the batches would differ
    before = (out / "config.json").read_text(), (out / "log.jsonl").read_text()
    r = train_here("--resume", "--out", out, "--data-dir", other, want=2)
    assert "train_images 200 then, 240 now" in one_error_line(r, "train.py")
    assert ((out / "config.json").read_text(), (out / "log.jsonl").read_text()) == before


def test_finetune_refuses_a_finetuned_checkpoint_and_a_config_without_a_size(
        tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    ckpt["config"]["model"]["num_classes"] = 10
    torch.save(ckpt, tmp_path / "ft.pt")
    r = train_here("--finetune", tmp_path / "ft.pt", "--out", tmp_path / "x", want=2)
    assert "already fine-tuned" in one_error_line(r, "train.py")
    del ckpt["config"]["model"]["size"]
    torch.save(ckpt, tmp_path / "nosize.pt")
    r = train_here("--finetune", tmp_path / "nosize.pt", "--out", tmp_path / "y", want=2)
    assert "not a umd checkpoint" in one_error_line(r, "train.py")


def test_a_huge_learning_rate_says_no_checkpoint_was_written(cifar_dir, tmp_path):
    out = tmp_path / "run"
    r = train_here("--data-dir", cifar_dir, *TINY, "--lr", "1e30", "--max-steps", 4,
                   "--out", out, want=2)
    line = one_error_line(r, "train.py")
    assert "non-finite" in line and "no checkpoint was written" in line


@pytest.mark.parametrize("first", [True, False])
def test_ctrl_c_during_a_checkpoint_write_waits_for_it(first, tmp_path, monkeypatch):
    real = machinery.save_atomic

    def interrupted_save(state, path):  # a Ctrl-C arrives in the middle of the write
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        real(state, path)

    monkeypatch.setattr(machinery, "save_atomic", interrupted_save)
    run = machinery.Run.__new__(machinery.Run)
    run.main, run.ckpt, run.stop = True, tmp_path / "ckpt.pt", not first
    run.previous = {signal.SIGINT: signal.default_int_handler}
    signal.signal(signal.SIGINT, run._on_signal if first else signal.default_int_handler)
    try:
        if first:  # the first one: the run stops gracefully at its next log point
            run.save({"step": 7})
            assert run.stop
        else:  # a second one: abort, once the write is whole
            with pytest.raises(KeyboardInterrupt):
                run.save({"step": 7})
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True) == {"step": 7}
    assert run.saved_step == 7 and not list(tmp_path.glob("*.tmp"))


def test_claim_removes_temp_files_a_killed_writer_left(tmp_path):
    (tmp_path / "ckpt.pt.123.tmp").write_bytes(b"half")
    (tmp_path / "samples.png.456.tmp").write_bytes(b"another writer's")  # not the run's: kept
    claim(tmp_path).close()
    assert [p.name for p in tmp_path.glob("*.tmp")] == ["samples.png.456.tmp"]


# ----------------------------------------------------------------------------- the other scripts
@pytest.mark.parametrize("flag", ["--cfg-scale", "--eta"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sample_refuses_non_finite_numbers(flag, value, tiny_run):
    r = run_here("sample.py", "--ckpt", tiny_run / "ckpt.pt", flag, value, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{flag} {value} is not a finite number" in r.stderr


def test_sample_makes_the_npz_folder_and_checks_outputs_first(tiny_run, tmp_path):
    npz = tmp_path / "new" / "dir" / "s.npz"
    r = run_script("sample.py", "--ckpt", tiny_run / "ckpt.pt", "--n", 4, "--steps", 2,
                   "--npz", npz, "--out", tmp_path / "s.png", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.load(npz)["samples"].shape == (4, 32, 32, 3) and not list(npz.parent.glob("*.tmp"))
    (tmp_path / "file").write_text("x")
    start = time.time()
    r = run_here("sample.py", "--ckpt", tiny_run / "ckpt.pt", "--n", 4, "--steps", 1000,
                 "--npz", tmp_path / "file" / "s.npz", "--device", "cpu")
    assert r.returncode == 2 and "sample.py: error: cannot use" in r.stderr, r.stderr
    assert time.time() - start < 30  # refused before 1000 sampling steps


def interrupt(cmd, ready):
    """Start a script, wait until its stderr shows `ready`, send Ctrl-C; (exit code, stderr)."""
    p = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = ""
    while ready not in seen:
        seen += p.stderr.read(1)
        assert seen or p.poll() is None
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    return p.wait(timeout=60), seen + p.stderr.read()


def test_ctrl_c_in_sample_and_probe_is_one_line_and_130(tiny_run, cifar_dir, tmp_path):
    out = tmp_path / "s.png"
    code, err = interrupt(["sample.py", "--ckpt", tiny_run / "ckpt.pt", "--n", 300,
                           "--batch-size", 300, "--device", "cpu", "--out", out], "sampling")
    assert code == 130 and "Traceback" not in err and "sample.py: interrupted" in err, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    code, err = interrupt(["probe.py", tiny_run / "ckpt.pt", "--data-dir", cifar_dir,
                           "--mode", "knn", "--batch-size", 1], "features")
    assert code == 130 and "Traceback" not in err and "probe.py: interrupted" in err, err


def image_folder(root, per_class):
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i % 256, np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("args,message", [
    (["--mode", "knn", "--k", "100000"], "--k 100000 is larger than the"),
    (["--mode", "knn", "--batch-size", "-1"], "--batch-size must be positive"),
    (["--mode", "linear", "--json", "{tmp}/f/x.json"], "cannot use"),
])
def test_probe_checks_what_it_needs_first(args, message, tiny_run, cifar_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_here("probe.py", tiny_run / "ckpt.pt", "--data-dir", cifar_dir,
                 *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_small_folders_say_what_they_lack(tiny_run, tmp_path):
    tiny = image_folder(tmp_path / "tiny", {"a": 3, "b": 3})  # no tenth image: no test split
    r = run_here("probe.py", "--pixels", "--dataset", "folder", "--data-dir", tiny,
                 "--img-size", 8, "--mode", "knn")
    assert r.returncode == 2 and "too few images for a test split" in r.stderr, r.stderr
    small = image_folder(tmp_path / "small", {"a": 10, "b": 10})  # 18 training images
    r = run_here("probe.py", "--pixels", "--dataset", "folder", "--data-dir", small,
                 "--img-size", 8, "--mode", "linear")
    assert r.returncode == 2 and "the linear probe" in r.stderr and "needs at least 20" in r.stderr
    r = train_here("--dataset", "folder", "--data-dir", small, "--img-size", 16,
                   "--model", "tiny", "--patch-size", 8, "--batch-size", 8, "--probe-every", 1,
                   "--out", tmp_path / "run", want=2)
    assert "--probe-every 0" in one_error_line(r, "train.py")


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    import data
    folder = image_folder(tmp_path / "f", {"a": 10})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 pixels: over twice the limit
    with pytest.raises(data.DataError, match="cannot read image"):
        data.load_image_folder(folder, 8)


def test_fid_prints_before_it_writes_and_refuses_bad_statistics(standin, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    rng = np.random.default_rng(0)
    for p in (a, b):
        np.savez(p, samples=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "made" / "f.json"  # a folder that does not exist yet is made
    r = run_script("tools/fid.py", a, b, "--inception", standin, "--json", out)
    assert r.returncode == 0 and "FID:" in r.stdout and json.loads(out.read_text())["fid"] >= 0
    (tmp_path / "file").write_text("x")
    r = run_here("tools/fid.py", a, b, "--inception", standin, "--json", tmp_path / "file" / "f")
    assert r.returncode == 2 and "cannot use" in r.stderr and "FID:" not in r.stdout
    np.savez(tmp_path / "nan.npz", mu=np.full(12, np.nan), sigma=np.eye(12))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(12), sigma=np.eye(5))
    (tmp_path / "cut.npz").write_bytes(a.read_bytes()[:200])
    for bad, message in [("nan.npz", "NaN"), ("shape.npz", "wrong shape"), ("cut.npz", "readable")]:
        r = run_here("tools/fid.py", tmp_path / bad, b, "--inception", standin)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 2, r.stderr
