"""Shared fixtures: a tiny CIFAR-10 in the official python format, written by the tests
(never downloaded); helpers that run the scripts as a user would (run_script, torchrun) or their
main() in this process (run_here); a shallower "tiny" where depth changes nothing."""
import atexit
import contextlib
import importlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The suite sees a CPU without native bf16, so it trains in eager float32 everywhere: on a CPU with
# it, the default would compile every training (a minute each), for hours. bf16 and compile are
# tested where a test asks for them by flag (test_compile) or patches these back (test_machinery).
NO_NATIVE_BF16 = ("import torch\ntorch.cpu._is_avx512_bf16_supported = lambda: False\n"
                  "torch.cpu._is_amx_tile_supported = lambda: False\n")
exec(NO_NATIVE_BF16)  # here, and in each script a test starts (sitecustomize)
SITE = Path(tempfile.mkdtemp(prefix="umd-tests-site-"))  # scripts in subprocesses import it
(SITE / "sitecustomize.py").write_text(NO_NATIVE_BF16)
atexit.register(shutil.rmtree, SITE, ignore_errors=True)
os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT)])
# 2 threads, as CI has; OMP_NUM_THREADS=1 leaves the other core to a job in the background
THREADS = int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


def write_cifar(data_dir, n_per_batch=40, seed=0):
    """data_dir/cifar-10-batches-py with 5 training batches and a test batch of n_per_batch
    images each, in the official layout (uint8 rows of R, G, B planes; byte-string keys).
    Images are class-coloured noise, so a representation can tell the classes apart."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(0, 256, size=(10, 3))
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=n_per_batch)
        img = palette[labels][:, :, None, None] * 0.6 + rng.integers(0, 100, size=(n_per_batch, 3, 32, 32))
        data = img.clip(0, 255).astype(np.uint8).reshape(n_per_batch, 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f)
        out[name] = (data, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f)
    return out


# "tiny" with 2 encoder blocks and 1 decoder block: dynamo and inductor trace every block alike, so
# the graphs, breaks and syncs of 2 blocks are those of 6, at a third of the tracing and training
SHALLOW = (192, 2, 1, 3)


@pytest.fixture(scope="module")
def shallow():
    """model.SIZES["tiny"] as SHALLOW for a whole test module (pytestmark usefixtures)."""
    from model import SIZES
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SIZES, "tiny", SHALLOW)
        yield


def shallow_env(folder):
    """The environment for scripts started in a subprocess with a SHALLOW tiny: folder gets the
    sitecustomize.py that Python imports at start-up, and it patches model.SIZES."""
    (Path(folder) / "sitecustomize.py").write_text(
        NO_NATIVE_BF16 + f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport model\n"
        f"model.SIZES['tiny'] = {SHALLOW}\n")
    return dict(PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar")
    write_cifar(d)
    return d


def run_script(*args, timeout=300, threads=THREADS, env=None):
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}  # PYTHONPATH: SITE, ROOT
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(script, *args, env=None):
    """`script args...` on 2 gloo processes under torchrun, the threads shared between them (two
    processes of 2 threads on 2 cores run several times slower than of 1)."""
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      script, *args, threads=max(1, THREADS // 2), env=env)


def run_here(script, *args):
    """`python <script> args...` as run_script returns it, but main(argv) in this process: for the
    one-line errors and short trainings, without a second's start of Python and torch for each,
    and with what the test patched (a failing loss, a full disk) in effect."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out, err, argv0 = io.StringIO(), io.StringIO(), sys.argv[0]
    sys.argv[0] = script  # argparse names the script in its errors, as it does from a shell
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv[0] = argv0
    return subprocess.CompletedProcess([script, *args], code or 0, out.getvalue(), err.getvalue())


def one_error_line(r, prog):
    """The one line of a CompletedProcess's stderr that names prog: "<prog>: error: ..."."""
    err = [l.split("\r")[-1] for l in r.stderr.splitlines() if f"{prog}:" in l]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err  # progress bars aside
    return err[0]


def train_here(*args, want=0):
    """run_here("train.py", *args) that asserts its exit status (0: the run finished)."""
    r = run_here("train.py", *args)
    assert r.returncode == want, r.stderr[-3000:]
    return r


# a tiny network on the tiny CIFAR-10, for train.py in the test process (run_here)
TINY = ["--model", "tiny", "--patch-size", "8", "--batch-size", "32", "--epochs", "2",
        "--probe-every", "0", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="session")
def tiny_run(cifar_dir, tmp_path_factory):
    """A finished pre-training run of a tiny UMD model (shared by probe and sample tests)."""
    out = tmp_path_factory.mktemp("runs") / "umd-tiny"
    r = run_script("train.py", "--data-dir", cifar_dir, "--model", "tiny", "--patch-size", "8", "--batch-size", "32",
                   "--epochs", "2", "--max-steps", "8", "--log-every", "4", "--probe-every", "0", "--device", "cpu",
                   "--out", out)
    assert r.returncode == 0, r.stderr
    return out


class StandInInception(torch.nn.Module):
    """A tiny network with the `layers` entry point of the real Inception TorchScript files: the
    mean of each channel over a 2x2 grid of the 299x299 input (12 features)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The stand-in network as a TorchScript file, for tools/fid.py --inception."""
    path = tmp_path_factory.mktemp("net") / "standin.pt"
    torch.jit.script(StandInInception()).save(str(path))
    return path
