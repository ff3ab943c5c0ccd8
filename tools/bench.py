"""Time training steps, count their FLOPs, and say what torch.compile did with them.

    python tools/bench.py --compare --model tiny --patch-size 4 --device cpu
    python tools/bench.py --compare --batch-size 1024  # small/2, compile + bf16 on a GPU
    python tools/bench.py --runs umd,dit,umd:eager --json b.json  # the bench of tools/gpu_check.sh
    python tools/bench.py --machine  # what compile needs, and a compile check

A run times train.py's step as it runs between two log points: the batch drawn and augmented on
the device, the learning rate set (it changes every step, as in the warm-up), forward (the UMD
loss), backward, clip, AdamW, EMA and the loss sums kept on the device. Per run: the first step's
seconds (compilation included), img/s and MFU over --steps timed steps after --warmup more, peak
memory, the graphs torch.compile made in the first step and after it (recompiles: 0 expected),
graph breaks (0 expected), and on CUDA the host-device synchronisations inside the timed steps
(torch.cuda.set_sync_debug_mode("warn"): 0 expected). Each run starts from an empty compile cache.

How FLOPs are counted (analytically, from the architecture and the realised token counts):
a matmul of [m, k] x [k, n] is 2*m*k*n FLOPs (a multiply-add is 2); every Linear, the patch
embedding and output head, the attention products QK^T and AV (4 * N^2 * d per block), the
adaLN and condition MLPs; LayerNorm, softmax, GELU and other elementwise work are left out
(<2% here). Backward = 2x forward, so a training step is 3x forward. UMD's cost per image is
the r_t0-weighted mean of its two groups. tests/test_bench.py checks the forward count against
torch.utils.flop_counter.
"""
import argparse
import contextlib
import copy
import ctypes
import functools
import importlib.metadata
import os
import platform
import shutil
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from config import METHODS  # noqa: E402
from corruption import cosine_alphas_cumprod, umd_loss  # noqa: E402
from data import Batches  # noqa: E402
from devices import (autocast, compile_preflight, cpu_has_native_bf16, pick,  # noqa: E402
                     precision)
from machinery import FlagError, LossMeter, TrainError, write_json  # noqa: E402
from model import SIZES, build_model, param_groups  # noqa: E402

PEAK_BF16 = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense TFLOP/s


class BenchError(Exception):
    """Bad flags: one line, exit status 2."""


def forward_flops(size, patch_size, img_size=32, channels=3, n_keep=None, conditional=False,
                  num_cls_tokens=4):
    """FLOPs of one image's forward pass with n_keep visible patches (None = all)."""
    d, depth, dec_depth, _ = SIZES[size]
    L = (img_size // patch_size) ** 2
    n_keep = L if n_keep is None else n_keep
    pp = patch_size * patch_size * channels
    # qkv 6, proj 2, MLP 16; attention; adaLN
    block = lambda N: 24 * N * d * d + 4 * N * N * d + 12 * d * d
    return (depth * block(num_cls_tokens + n_keep) + dec_depth * block(1 + L)
            + 2 * L * pp * d + 2 * L * d * 2 * pp + 4 * d * d  # patch embedding, head, final adaLN
            + 8 * d * d * (2 if conditional else 1))  # time (and label) MLPs


def step_flops(size, patch_size, r_t0, mask_ratio, mask_ratio_t0, img_size=32):
    """(training FLOPs per image, mean encoder patch tokens per image) of one step of a method."""
    L = (img_size // patch_size) ** 2
    keep0, keep = int(L * (1 - mask_ratio_t0)), int(L * (1 - mask_ratio))
    fwd = r_t0 * forward_flops(size, patch_size, img_size, n_keep=keep0) + \
        (1 - r_t0) * forward_flops(size, patch_size, img_size, n_keep=keep)
    return 3 * fwd, r_t0 * keep0 + (1 - r_t0) * keep


def peak_flops(device):
    """The FLOP/s that MFU divides by: a GPU's datasheet bf16 peak; on a CPU, its fastest matmul
    (float32 or bf16) measured at the step's shapes."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return max(matmul_flops(torch.float32), matmul_flops(torch.bfloat16))


@functools.cache  # once per process: every run of a bench divides by the same peak
def matmul_flops(dtype, m=8704, k=192, n=768, seconds=1.0):
    """FLOP/s of the CPU's best matmul at a step's shapes (tiny/4, batch 128: [8704 x 192] x
    [192 x 768], and its MLP's [8704 x 768] x [768 x 192]), the best of repeated runs. The first
    run (packing, thread pool) counts only where it is the one run: a slow, emulated bf16."""
    best = 0.0
    for a, b in (((m, k), (k, n)), ((m, n), (n, k))):
        x, w = torch.randn(*a, dtype=dtype), torch.randn(*b, dtype=dtype)
        end, runs = time.perf_counter() + seconds / 2, []
        while not runs or time.perf_counter() < end:
            t = time.perf_counter()
            x @ w
            runs.append(time.perf_counter() - t)
        best = max(best, 2 * a[0] * a[1] * b[1] / min(runs[1:] or runs))
    return best


def rss_bytes(peak=False):
    """The process's resident memory now, or its peak since reset_peak_rss() (Linux)."""
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))


def reset_peak_rss():
    """VmHWM back to the RSS, after glibc has handed back the memory that earlier steps and runs
    freed: else the next step reuses it unseen, and a second run of a bench reads 0 MiB/img."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def compile_counts():
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@contextlib.contextmanager
def sync_watch(on):
    """The host-device synchronisations CUDA reports meanwhile
    (a list of messages; None off CUDA)."""
    if not on:
        yield None
        return
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(0)
            seen += [str(w.message).splitlines()[0] for w in caught
                     if "synchroniz" in str(w.message)]


def bench(method, compiled, args, device):
    """One run: the first step, args.warmup more, then args.steps timed;
    returns a dict of results."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch._dynamo.reset()  # an empty compile cache: this run's graphs only, no recompile limit
    preset = dict(METHODS[method])
    model = build_model(args.model, args.patch_size).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    net = torch.compile(model, dynamic=False, backend=args.backend) if compiled else model
    ac = cosine_alphas_cumprod().to(device)
    total = 1 + args.warmup + args.steps
    # random uint8 images, enough for every step in one epoch (no data-order reshuffle mid-way)
    images = torch.randint(0, 256, (args.batch_size * total, 3, 32, 32), dtype=torch.uint8)
    batches = Batches(images, torch.zeros(len(images), dtype=torch.long),
                      args.batch_size, 0, device)
    meter, gen = LossMeter(device), torch.Generator(device)

    def step(i):  # train.py's step, in its order
        for group in opt.param_groups:
            group["lr"] = 1e-4 * (i + 1) / total
        gen.manual_seed(i)
        x0, _ = batches.get(i, gen)
        with autocast(device, args.amp):
            loss, stats = umd_loss(net, x0, alphas_cumprod=ac, generator=gen, **preset)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema_params, params, 1 - 0.9999)
        meter.add(i, [(loss, stats)])

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphs0, breaks0 = compile_counts()
    t = time.perf_counter()
    step(0)
    sync()
    first = time.perf_counter() - t
    graphs1, _ = compile_counts()
    for i in range(1, 1 + args.warmup):
        step(i)
    sync()
    # what the timed steps add to weights, grads, AdamW and EMA: exact from the CUDA allocator, the
    # growth of the resident memory on a CPU
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    else:
        reset_peak_rss()
        base = rss_bytes()
    with sync_watch(cuda) as syncs:
        t = time.perf_counter()
        if cuda:
            start.record()
        for i in range(1 + args.warmup, total):
            step(i)
        if cuda:
            end.record()
            end.synchronize()
        seconds = start.elapsed_time(end) / 1000 if cuda else time.perf_counter() - t
    graphs2, breaks2 = compile_counts()
    peak_mem = torch.cuda.max_memory_allocated() if cuda else rss_bytes(peak=True)
    (loss, _, _), _, _, bad = meter.read(1)
    if bad >= 0:
        raise RuntimeError(f"the loss became non-finite at step {bad}")
    flops, tokens = step_flops(args.model, args.patch_size, **preset)
    img_s = args.steps * args.batch_size / seconds
    peak = peak_flops(device)
    return dict(method=method, compiled=compiled, tokens=tokens, gflop=flops / 1e9,
                first_step_s=first, img_s=img_s, ms=1000 * seconds / args.steps,
                mem_gib=peak_mem / 2 ** 30,
                mib_per_img=(peak_mem - base) / args.batch_size / 2 ** 20,
                tflop_s=flops * img_s / 1e12, mfu=None if peak is None else flops * img_s / peak,
                loss=loss, graphs=graphs1 - graphs0 if compiled else None,
                recompiles=graphs2 - graphs1 if compiled else None,
                graph_breaks=breaks2 - breaks0 if compiled else None,
                syncs=None if syncs is None else len(syncs), sync_first=(syncs or [None])[0])


def runs_of(args):
    """(method, compiled, label) of each run: --runs, else --compare's four methods,
    else --method."""
    if args.runs:
        items = [s.strip() for s in args.runs.split(",") if s.strip()]
    else:
        items = list(METHODS) if args.compare else [args.method]
    runs = []
    for item in items:
        method, _, mode = item.partition(":")
        if method not in METHODS or mode not in ("", "compile", "eager"):
            raise BenchError(f"--runs: {item!r} is not METHOD or METHOD:compile or METHOD:eager "
                             f"(methods: {', '.join(METHODS)})")
        runs.append((method, args.compile if not mode else mode == "compile",
                     f"{method} {mode}" if mode else method))
    if not runs:
        raise BenchError("--runs names no run")
    return runs


def machine(device, backend):
    """What torch.compile needs here (Triton on CUDA, a C compiler), and whether it works."""
    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None
    cuda = device.type == "cuda"
    info = dict(
        device=torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        triton=version("triton", "pytorch-triton"),
        c_compiler=next(
            filter(None, map(shutil.which, (os.environ.get("CC") or "cc", "gcc", "clang"))), None),
        backend=backend)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2 ** 30, 1),
            bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version(),
            peak_bf16_tflops=None if peak_flops(device) is None else peak_flops(device) / 1e12)
    else:  # what MFU divides by on a CPU, and what the default precision rests on
        info.update(capability=torch.backends.cpu.get_cpu_capability(),
                    native_bf16=cpu_has_native_bf16(),
                    matmul_gflops_fp32=round(matmul_flops(torch.float32) / 1e9),
                    matmul_gflops_bf16=round(matmul_flops(torch.bfloat16) / 1e9))
    amp, use_compile, why = precision(device)
    info["default"] = f"amp {amp}, compile {use_compile} ({why})"
    t = time.perf_counter()
    try:
        compile_preflight(device, backend)
        info["compile"] = "ok"
    except TrainError as e:
        info["compile"] = str(e)
    info["compile_s"] = round(time.perf_counter() - t, 2)
    return info


def table(rows, cuda):
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["method"] == "dit"), None)
    mem_label = "peak GiB" if cuda else "peak RSS GiB"
    lines = [f"| method | enc. tokens/img | GFLOP/img | img/s | ms/step | {mem_label} | MiB/img | "
             "TFLOP/s | MFU | first step s | graphs | recompiles | graph breaks | syncs |"
             + (" time/img vs dit | FLOPs/img vs dit |" if ref else ""),
             "|---" * (14 + 2 * bool(ref)) + "|"]
    dash = lambda v, f="{}": "-" if v is None else f.format(v)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |")
            continue
        line = (f"| {r['label']} | {r['tokens']:.0f} | {r['gflop']:.2f} | {r['img_s']:.0f} | "
                f"{r['ms']:.1f} | {r['mem_gib']:.2f} | {r['mib_per_img']:.1f} | "
                f"{r['tflop_s']:.2f} | "
                f"{dash(r['mfu'] and 100 * r['mfu'], '{:.1f}%')} | {r['first_step_s']:.1f} | "
                f"{dash(r['graphs'])} | {dash(r['recompiles'])} | {dash(r['graph_breaks'])} | "
                f"{dash(r['syncs'])} |")
        if ref:  # cost ratios: time per image and FLOPs per image, relative to dit
            line += f" {ref['img_s'] / r['img_s']:.2f}x | {r['gflop'] / ref['gflop']:.2f}x |"
        lines.append(line)
    return lines


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), default="umd")
    p.add_argument("--compare", action="store_true",
                   help="umd, mae, dit and maskdit with the same network, one table")
    p.add_argument("--runs", help="comma-separated runs, each METHOD, METHOD:compile or "
                   "METHOD:eager (e.g. umd,dit,umd:eager); overrides --method and --compare")
    p.add_argument("--machine", action="store_true",
                   help="only say what torch.compile needs here (Triton, a C compiler) and check "
                   "that it works, as train.py does before its first step; exit 1 if not")
    p.add_argument("--model", choices=list(SIZES), default="small")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 1024 on CUDA, 128 on the CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default 20 on CUDA, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first one (default 5 on CUDA, 1 on the CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as train.py (on with CUDA or a CPU with native bf16)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (default inductor, as train.py)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="default: as train.py (bf16 with CUDA or a CPU with native bf16)")
    p.add_argument("--json", metavar="PATH",
                   help="also write every number here (rewritten after each run)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        device = pick(args.device)
        cuda = device.type == "cuda"
        if cuda:  # as train.py
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if args.machine:
            info = machine(device, args.backend)
            print("\n".join(f"{k}: {v}" for k, v in info.items()))
            if args.json:
                write_json(info, args.json)
            return 0 if info["compile"] == "ok" else 1
        args.batch_size = (args.batch_size if args.batch_size is not None
                           else (1024 if cuda else 128))
        args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
        args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
        args.amp, args.compile, _ = precision(device, args.amp, args.compile)  # as train.py
        if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
            raise BenchError("--batch-size must be at least 2, --steps at least 1, "
                             "--warmup at least 0")
        if args.patch_size < 1 or 32 % args.patch_size:
            raise BenchError(f"--patch-size {args.patch_size} must divide the 32-pixel image "
                             "(2, 4, 8)")
        runs = runs_of(args)
    except (BenchError, FlagError, TrainError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    name = (torch.cuda.get_device_name(device) if cuda
            else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    head = (f"# {name}; {args.model}/p{args.patch_size}, batch {args.batch_size}, "
            f"amp {args.amp}, backend {args.backend}; "
            f"{args.steps} timed steps after 1 + {args.warmup}; torch {torch.__version__}")
    print(head, flush=True)
    rows, record = [], dict(device=name, torch=torch.__version__, settings={
        k: getattr(args, k)
        for k in ("model", "patch_size", "batch_size", "steps", "warmup", "amp", "backend")})
    for method, compiled, label in runs:
        try:
            row = dict(bench(method, compiled, args, device), label=label)
        except Exception as e:  # one failed run (compile error, OOM) does not stop the others
            reason = next((l for l in str(e).splitlines() if l.strip()), "")[:200]
            row = dict(method=method, compiled=compiled, label=label,
                       error=f"{type(e).__name__}: {reason}")
            print(f"bench.py: {label} failed: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:  # after every run: a stage stopped at its time limit keeps what it measured
            write_json(dict(record, runs=rows), args.json)
    print("\n".join(table(rows, cuda)))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
