"""torch.compile proven on the CPU (aot_eager: the graphs dynamo captures are the ones inductor
would compile on a GPU, at a fraction of the compile time): train.py's step compiles whole for
every method and the fine-tune, into the expected graphs (umd 2, one per group; the others 1),
and never again after the first step, through log points, probes and learning-rate changes; no
host-device synchronisation inside a step between log points; DDP with compile on 2 gloo
processes trains and matches one process doing both ranks' work; exact resume with compile and
bf16 on the CPU; the compile preflight."""
import json
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import config
import devices
import machinery
import train
from conftest import ROOT, shallow_env, torchrun, write_cifar
from corruption import umd_loss
from data import Batches, Stream, derive_seed, load_dataset

TINY = ["--model", "tiny", "--patch-size", "8", "--batch-size", "32", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("shallow")  # conftest.SHALLOW: 2 blocks prove 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """1,500 training images: at least 100 of every class, as the in-training probe needs."""
    d = tmp_path_factory.mktemp("cifar-probe")
    write_cifar(d, n_per_batch=300)
    return d


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "umd"
    argv = ["--data-dir", data_dir, *TINY, "--epochs", "1", "--max-steps", "2", "--probe-every", "0", "--out", out]
    assert train.train(config.get_args(list(map(str, argv)))) == 0
    return out / "ckpt.pt"


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile as devices.wrap calls it, on the aot_eager backend, from an empty cache."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr(devices, "compile_preflight", lambda device: None)  # its graph is not ours
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs_and_breaks():
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


CASES = {  # method flags, graphs expected (one per group of the batch that has images)
    "umd": (["--method", "umd"], 2),
    "mae": (["--method", "mae"], 1),
    "dit": (["--method", "dit"], 1),
    "maskdit": (["--method", "maskdit"], 1),
    "finetune": (["--finetune", "{ckpt}"], 2),  # umd's fine-tune: 1 noise-free image of 32, 31 noisy ones
    "umd-accum": (["--grad-accum", "2"], 2),  # two equal micro-batches: the same two graphs serve both
    "umd-bf16": (["--amp", "bf16"], 2),  # what a CPU with native bf16 runs by default
}


def flags(case, pretrained):
    method, expected = CASES[case]
    method = [str(pretrained) if f == "{ckpt}" else f for f in method]
    tiny = TINY if case != "finetune" else TINY[4:]  # a fine-tune keeps the checkpoint's network
    return [*tiny, *method], expected


# bf16's graphs: counted in the resume test below
@pytest.mark.parametrize("case", [c for c in CASES if c != "umd-bf16"])
def test_the_step_compiles_once_into_the_expected_graphs(case, data_dir, pretrained, tmp_path, aot_eager, monkeypatch):
    argv, expected = flags(case, pretrained)
    per_step, real_end_step = [], machinery.Run.end_step

    def end_step(self, step, lr, losses):  # after each step: what dynamo has compiled so far
        per_step.append(graphs_and_breaks())
        return real_end_step(self, step, lr, losses)

    monkeypatch.setattr(machinery.Run, "end_step", end_step)
    # 46 steps per epoch: log points every 2 steps, the lr warming up; in umd and its fine-tune,
    # probes at steps 0, 3 and 6 (a probe's eval and no_grad are the same for every method)
    probes = [0, 3, 6] if case in ("umd", "finetune") else []
    argv += ["--data-dir", data_dir, "--compile", "--epochs", "1", "--max-steps", "6", "--log-every", "2",
             "--probe-every", 0.065 if probes else 0, "--out", tmp_path / "run"]
    assert train.train(config.get_args(list(map(str, argv)))) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "probe" in r] == probes
    assert [r["step"] for r in log if "loss" in r] == ([2, 3, 4, 6] if probes else [2, 4, 6])
    assert len({r["lr"] for r in log if "lr" in r}) >= 3  # the learning rate warms up, then decays
    assert per_step == [(expected, 0)] * 6  # all graphs at the first step, no graph break, no recompile


class SyncCounter(TorchDispatchMode):
    """Counts the operators that make a GPU host wait (a value read back, a data-dependent shape),
    by where train.py's loop is: in a step, in the optimizer (the CPU AdamW reads its step counts:
    exempt, as the fused CUDA one does not), or at a log point."""
    SYNCS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.equal,
             torch.ops.aten.masked_select, torch.ops.aten._unique2, torch.ops.aten.unique_consecutive}

    def __init__(self):
        super().__init__()
        self.where, self.found = "setup", Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCS:
            self.found[self.where, func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(argv, monkeypatch):
    """Runs train.train(argv) eagerly under a SyncCounter that follows the loop: a step starts with
    its learning rate (lr_at), the optimizer runs inside its hooks, a log point starts when
    at_log_point says so."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    mode, real_lr, real_at_log_point = SyncCounter(), train.lr_at, machinery.Run.at_log_point

    def lr_at(*a):
        mode.where = "step"
        return real_lr(*a)

    def at_log_point(self, due):
        here = real_at_log_point(self, due)
        if here:
            mode.where = "log point"
        return here

    monkeypatch.setattr(train, "lr_at", lr_at)
    monkeypatch.setattr(machinery.Run, "at_log_point", at_log_point)
    hooks = [register_optimizer_step_pre_hook(lambda *a: setattr(mode, "where", "optimizer")),
             register_optimizer_step_post_hook(lambda *a: setattr(mode, "where", "step"))]
    try:
        with mode:
            assert train.train(config.get_args(list(map(str, argv)))) == 0
    finally:
        for h in hooks:
            h.remove()
    return mode.found


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_device_sync_inside_a_step(case, data_dir, pretrained, tmp_path, monkeypatch):
    argv, _ = flags(case, pretrained)
    found = count_syncs([*argv, "--data-dir", data_dir, "--no-compile", "--epochs", "1", "--max-steps", "4",
                         "--log-every", "2", "--probe-every", "0", "--out", tmp_path / "run"], monkeypatch)
    assert not [k for k in found if k[0] == "step"], found
    assert found["log point", "_local_scalar_dense"] > 0  # the host reads the losses there, and only there


def test_the_sync_counter_sees_a_value_read_in_a_step(data_dir, tmp_path, monkeypatch):
    def reads_the_loss(*a, **k):
        loss, stats = umd_loss(*a, **k)
        loss.detach().item()  # what a per-step loss.item() would do
        return loss, stats

    monkeypatch.setattr(train, "umd_loss", reads_the_loss)
    found = count_syncs(["--data-dir", data_dir, *TINY, "--epochs", "1", "--max-steps", "2", "--log-every", "2",
                         "--probe-every", "0", "--out", tmp_path / "run"], monkeypatch)
    assert found["step", "_local_scalar_dense"] == 2


LAUNCHER = '''"""train.py under torchrun, torch.compile on the aot_eager backend; each rank writes what it compiled."""
import atexit, json, os, sys
sys.path.insert(0, {root!r})
import torch
from torch._dynamo.utils import counters
real = torch.compile
torch.compile = lambda model, **kw: real(model, **{{**kw, "backend": "aot_eager"}})
import devices, train
devices.compile_preflight = lambda device: None  # its graph is not the step's
def report():
    with open(os.path.join({counts!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(dict(graphs=counters["stats"]["unique_graphs"], breaks=list(counters["graph_break"])), f)
atexit.register(report)
train.main()
'''


def one_process_doing_both_ranks(argv, steps):
    """train.py's loop for 2 DDP ranks, in one process without DDP or compile: each rank's share of
    the batch, its own random stream and noise-free share; the gradient is their mean, as DDP's."""
    args = config.resolve(config.get_args(argv))
    ds, device = load_dataset("cifar10", args.data_dir), torch.device("cpu")
    model, ema, opt = train.build(args, ds, device, None)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    batches = Batches(ds.train_x, ds.train_y, args.batch_size, args.seed, device, args.min_area, 2)
    total = round(args.epochs * batches.steps_per_epoch)
    ac, gen = train.cosine_alphas_cumprod(), torch.Generator()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, total, round(args.warmup * total), args.lr * args.batch_size / 256)
        for rank in (0, 1):
            gen.manual_seed(derive_seed(args.seed, Stream.STEP, step, rank))
            x0, _ = batches.get(step, gen, rank)
            loss, _ = umd_loss(model, x0, r_t0=args.r_t0, n0=devices.noise_free_share(args.batch_size, args.r_t0, rank, 2),
                               mask_ratio=args.mask_ratio, mask_ratio_t0=args.mask_ratio_t0, alphas_cumprod=ac,
                               generator=gen)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train.update_ema(ema_params, params, train.ema_decay_at(step, args))
    return model.state_dict(), ema.state_dict()


def test_ddp_with_compile_on_two_gloo_processes_matches_one_process(data_dir, tmp_path):
    launcher, counts = tmp_path / "launch.py", tmp_path / "counts"
    counts.mkdir()
    launcher.write_text(LAUNCHER.format(root=str(ROOT), counts=str(counts)))
    common = ["--data-dir", data_dir, *TINY, "--epochs", "1", "--probe-every", "0", "--seed", "3"]
    r = torchrun(launcher, *common, "--max-steps", 3, "--log-every", 1, "--compile", "--out", tmp_path / "ddp",
                 env=shallow_env(tmp_path))  # the 2 blocks that this process has
    assert r.returncode == 0, r.stderr[-2000:]
    config_ = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config_["world_size"] == 2 and config_["compile"] is True
    for rank in (0, 1):  # umd's two graphs on each rank; dynamo breaks only around DDP's own forward
        c = json.loads((counts / f"rank{rank}.json").read_text())
        assert c["graphs"] == 2, c
        assert all("_inside_ddp_forward" in b or "set_runtime_stats_and_log" in b for b in c["breaks"]), c
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    model, ema = one_process_doing_both_ranks(list(map(str, [*common, "--out", tmp_path / "one"])), 3)
    for name, ref in [("model", model), ("ema", ema)]:
        for k, v in ref.items():
            got = ckpt[name][k]
            assert torch.allclose(got, v, rtol=1e-4, atol=1e-6), (name, k, (got - v).abs().max().item())


def test_resume_with_compile_and_bf16_on_the_cpu_is_exact(data_dir, tmp_path, aot_eager):
    common = ["--data-dir", data_dir, *TINY, "--epochs", "1", "--probe-every", "0", "--log-every", "1",
              "--compile", "--amp", "bf16"]
    run = lambda *argv: train.train(config.get_args(list(map(str, [*common, *argv]))))
    assert run("--max-steps", 6, "--out", tmp_path / "a") == 0
    assert graphs_and_breaks() == (2, 0)  # bf16 autocast compiles into umd's two graphs, once
    assert run("--max-steps", 3, "--out", tmp_path / "b") == 0
    assert train.train(config.get_args(list(map(str, [
        "--data-dir", data_dir, "--resume", "--out", tmp_path / "b", "--max-steps", 6])))) == 0
    log = lambda d: [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
    config_ = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config_["amp"] == "bf16" and config_["compile"] is True
    assert [r["loss"] for r in log(tmp_path / "a")] == [r["loss"] for r in log(tmp_path / "b")]
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_compile_preflight(monkeypatch):
    cpu = torch.device("cpu")
    devices.compile_preflight(cpu, "aot_eager")  # a working compiler stack: nothing to say

    def no_triton(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or "
                           "it is too old.\nMore information on installing Triton can be found at ...")

    with pytest.raises(machinery.TrainError) as e:
        devices.compile_preflight(cpu, no_triton)
    message = str(e.value)
    assert "\n" not in message and "--no-compile" in message and "Cannot find a working triton" in message
