"""Time training steps (forward, backward, clip, AdamW) and count their FLOPs.

    python tools/bench.py --compare --model tiny --patch-size 4 --device cpu
    python tools/bench.py --compare --batch-size 1024          # small/2, compile + bf16 on a GPU

How FLOPs are counted (analytically, from the architecture and the realised token counts):
a matmul of [m, k] x [k, n] is 2*m*k*n FLOPs (a multiply-add is 2); every Linear, the patch
embedding and output head, the attention products QK^T and AV (4 * N^2 * d per block), the
adaLN and condition MLPs; LayerNorm, softmax, GELU and other elementwise work are left out
(<2% here). Backward = 2x forward, so a training step is 3x forward. UMD's cost per image is
the r_t0-weighted mean of its two groups. tests/test_bench.py checks the forward count against
torch.utils.flop_counter.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from corruption import cosine_alphas_cumprod, umd_loss  # noqa: E402
from model import SIZES, build_model, no_decay  # noqa: E402
from config import METHODS  # noqa: E402

PEAK_BF16 = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense TFLOP/s


def forward_flops(size, patch_size, img_size=32, channels=3, n_keep=None, conditional=False, num_cls_tokens=4):
    """FLOPs of one image's forward pass with n_keep visible patches (None = all)."""
    d, depth, dec_depth, _ = SIZES[size]
    L = (img_size // patch_size) ** 2
    n_keep = L if n_keep is None else n_keep
    pp = patch_size * patch_size * channels
    block = lambda N: 24 * N * d * d + 4 * N * N * d + 12 * d * d  # qkv 6, proj 2, MLP 16; attention; adaLN
    return (depth * block(num_cls_tokens + n_keep) + dec_depth * block(1 + L)
            + 2 * L * pp * d + 2 * L * d * 2 * pp + 4 * d * d  # patch embedding, head, final modulation
            + 8 * d * d * (2 if conditional else 1))  # time (and label) MLPs


def step_flops(size, patch_size, r_t0, mask_ratio, mask_ratio_t0, img_size=32):
    """(training FLOPs per image, mean encoder patch tokens per image) of one step of a method."""
    L = (img_size // patch_size) ** 2
    keep0, keep = int(L * (1 - mask_ratio_t0)), int(L * (1 - mask_ratio))
    fwd = r_t0 * forward_flops(size, patch_size, img_size, n_keep=keep0) + \
        (1 - r_t0) * forward_flops(size, patch_size, img_size, n_keep=keep)
    return 3 * fwd, r_t0 * keep0 + (1 - r_t0) * keep


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench(method, args, device):
    """Times args.steps training steps after args.warmup; returns a dict of results."""
    torch.manual_seed(0)
    preset = dict(METHODS[method])
    model = build_model(args.model, args.patch_size).to(device)
    params = list(model.parameters())
    groups = [dict(params=[p for n, p in model.named_parameters() if not no_decay(n)], weight_decay=0.05),
              dict(params=[p for n, p in model.named_parameters() if no_decay(n)], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    net = torch.compile(model, dynamic=False) if args.compile else model
    ac = cosine_alphas_cumprod().to(device)
    x0 = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1
    gen = torch.Generator(device).manual_seed(0)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def step():
        with torch.autocast(device.type, amp, enabled=amp is not None):
            loss, _ = umd_loss(net, x0, alphas_cumprod=ac, generator=gen, **preset)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # compile, autotune, allocator warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        mem = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - t
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (GiB)
    flops, tokens = step_flops(args.model, args.patch_size, **preset)
    img_s = args.steps * args.batch_size / seconds
    peak = peak_flops(device)
    return dict(method=method, tokens=tokens, gflop=flops / 1e9, img_s=img_s, ms=1000 * seconds / args.steps,
                mem=mem, tflop_s=flops * img_s / 1e12, mfu=None if peak is None else flops * img_s / peak)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), default="umd")
    p.add_argument("--compare", action="store_true", help="umd, mae, dit and maskdit with the same network, one table")
    p.add_argument("--model", choices=list(SIZES), default="small")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 on CUDA, 128 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 2 on the CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="default bf16 on CUDA, off on the CPU")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (1024 if cuda else 128)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.compile = cuda if args.compile is None else args.compile
    args.amp = args.amp or ("bf16" if cuda else "off")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"# {name}; {args.model}/p{args.patch_size}, batch {args.batch_size}, amp {args.amp}, compile {args.compile}, "
          f"{args.steps} timed steps after {args.warmup}; torch {torch.__version__}")
    rows = [bench(m, args, device) for m in (METHODS if args.compare else [args.method])]
    ref = next((r for r in rows if r["method"] == "dit"), None)
    mem_label = "peak GiB" if cuda else "RSS GiB"
    print(f"| method | enc. tokens/img | GFLOP/img | img/s | ms/step | {mem_label} | TFLOP/s | MFU |"
          + (" time/img vs dit | FLOPs/img vs dit |" if ref else ""))
    print("|---" * (8 + 2 * bool(ref)) + "|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        line = (f"| {r['method']} | {r['tokens']:.0f} | {r['gflop']:.2f} | {r['img_s']:.0f} | {r['ms']:.1f} | "
                f"{r['mem']:.2f} | {r['tflop_s']:.2f} | {mfu} |")
        if ref:  # cost ratios: time per image and FLOPs per image, relative to dit
            line += f" {ref['img_s'] / r['img_s']:.2f}x | {r['gflop'] / ref['gflop']:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
