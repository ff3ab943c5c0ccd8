"""Pre-train UMD (or MAE, DiT, MaskDiT: settings of the same step) on CIFAR-10, or fine-tune a
pre-trained checkpoint into a class-conditional generator.

    python train.py --dataset cifar10                      # UMD, small/2, the official recipe
    python train.py --model tiny --patch-size 4 --batch-size 128 --epochs 4 --device cpu
    python train.py --finetune runs/umd-small-p2/ckpt.pt   # class-conditional fine-tune
    python train.py --resume --out runs/umd-small-p2       # continue exactly where it stopped
    torchrun --nproc_per_node 8 train.py                   # several GPUs (DDP)
"""
import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from corruption import cosine_alphas_cumprod, noise_free_share, umd_loss
from data import Batches, DataError, derive_seed, load_dataset_once, to_float
from model import SIZES, CheckpointError, UMDModel, no_decay, read_checkpoint
from probe import QuickProbe
from sample import reconstruction_rows, save_grid

# Every method is a setting of the one UMD step (method.md section 1).
METHODS = {
    "umd": dict(r_t0=0.5, mask_ratio_t0=0.75, mask_ratio=0.375),
    "mae": dict(r_t0=1.0, mask_ratio_t0=0.75, mask_ratio=0.0),
    "dit": dict(r_t0=0.0, mask_ratio_t0=0.75, mask_ratio=0.0),
    "maskdit": dict(r_t0=0.0, mask_ratio_t0=0.75, mask_ratio=0.5),
}
# Recipes (method.md section 4). warmup_epochs None = 5% of the epochs (fine-tune: 4%, i.e. 2 of 50).
PRETRAIN = dict(epochs=800, batch_size=1024, lr=1.5e-4, beta2=0.95, weight_decay=0.05, warmup_epochs=None,
                min_area=0.8, label_dropout=0.0, ema_decay=0.9999)
FINETUNE = dict(epochs=50, batch_size=256, lr=1.5e-4, beta2=0.999, weight_decay=0.0, warmup_epochs=None,
                min_area=0.95, label_dropout=0.1, ema_decay=0.9999, mask_ratio=0.0)
# On --resume these come from the command line; everything else comes from the saved run.
RUNTIME = ("max_steps", "log_every", "device", "compile", "amp", "probe_every", "ckpt_minutes", "data_dir")


class TrainError(Exception):
    """A run that cannot start or go on (bad flags, a non-finite loss): one line, exit status 2."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=["cifar10", "folder"], default="cifar10", help="cifar10, or folder: --data-dir/<class>/<image>")
    a("--data-dir", default="./data", help="where cifar-10-batches-py lives or is downloaded (default ./data)")
    a("--img-size", type=int, default=32, help="image size for --dataset folder (default 32)")
    a("--method", choices=list(METHODS), default=None, help="loss preset (default umd; on --finetune, the checkpoint's)")
    a("--model", choices=list(SIZES), default=None, help="network size (default small)")
    a("--patch-size", type=int, default=None, help="patch size (default 2: a 16x16 grid on CIFAR-10)")
    a("--r-t0", type=float, default=None, help="fraction of each batch on the noise-free step (umd 0.5)")
    a("--mask-ratio", type=float, default=None, help="patches dropped on noisy steps (umd 0.375)")
    a("--mask-ratio-t0", type=float, default=None, help="patches dropped on the noise-free step (0.75)")
    a("--epochs", type=float, default=None, help="length of the schedule (800; fine-tune 50)")
    a("--max-steps", type=int, default=None, help="stop after global step N (the lr schedule still follows --epochs)")
    a("--batch-size", type=int, default=None, help="global batch size (1024; fine-tune 256)")
    a("--lr", type=float, default=None, help="peak learning rate per 256 images (1.5e-4)")
    a("--warmup-epochs", type=float, default=None, help="linear warm-up (5%% of the epochs; fine-tune 4%%: 2 of 50)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay (0.05; fine-tune 0)")
    a("--beta2", type=float, default=None, help="AdamW beta2 (0.95; fine-tune 0.999)")
    a("--min-area", type=float, default=None, help="random-resized crop: smallest area fraction (0.8; fine-tune 0.95)")
    a("--ema-decay", type=float, default=None, help="EMA of the weights (0.9999, warmed up as min(d, (1+s)/(10+s)))")
    a("--label-dropout", type=float, default=None, help="fine-tune: labels dropped to null for guidance (0.1)")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip (1.0)")
    a("--finetune", metavar="CKPT", help="class-conditional fine-tune from this pre-trained checkpoint")
    a("--out", help="run directory (default runs/<method>-<model>-p<patch>[-ft])")
    a("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    a("--seed", type=int, default=0, help="fixes init, data order, augmentation, masks, noise and t")
    a("--log-every", type=int, default=None, help="steps between log lines (default 50)")
    a("--probe-every", type=float, default=None, help="epochs between few-shot ridge probes (default 10; 0 = off)")
    a("--ckpt-minutes", type=float, default=None, help="minutes between checkpoints (default 10)")
    a("--device", choices=["auto", "cuda", "cpu"], default=None, help="default auto: cuda when available")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on with CUDA)")
    a("--amp", choices=["bf16", "fp16", "off"], default=None, help="autocast (default bf16 on CUDA, off on CPU)")
    return p.parse_args(argv)


def resolve(args):
    """Fill unset flags: from the saved run (--resume), else from the method preset and recipe."""
    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise TrainError("--resume needs --out, the run directory to continue")
        if not (out / "ckpt.pt").exists():
            raise TrainError(f"--resume: no checkpoint at {out / 'ckpt.pt'}; start the run without --resume")
        saved = read_checkpoint(out / "ckpt.pt")["config"].get("train")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{out / 'ckpt.pt'} holds no training settings: it was not written by train.py")
        cli = vars(args)
        runtime = {k: cli[k] for k in RUNTIME if cli[k] is not None or k == "max_steps"}
        return argparse.Namespace(**{**saved, **runtime, "out": str(out), "resume": True})
    pre = None
    if args.finetune:
        if args.model or args.patch_size:
            raise TrainError("--model and --patch-size come from the --finetune checkpoint; drop them")
        pre = read_checkpoint(args.finetune)["config"]
        args.method = args.method or pre.get("train", {}).get("method", "umd")
        args.model, args.patch_size = pre["model"]["size"], pre["model"]["patch_size"]
    args.method = args.method or "umd"
    args.model, args.patch_size = args.model or "small", args.patch_size or 2
    preset = {**METHODS[args.method], **(PRETRAIN if pre is None else FINETUNE)}
    if pre is not None:
        preset["r_t0"] = 0.05 if args.method in ("umd", "mae") else 0.0
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup_epochs is None:
        args.warmup_epochs = (0.05 if pre is None else 0.04) * args.epochs
    defaults = dict(log_every=50, probe_every=10.0, ckpt_minutes=10.0, device="auto")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    name = f"{args.method}-{args.model}-p{args.patch_size}" + ("-ft" if pre else "")
    args.out = str(out or Path("runs") / name)
    if (Path(args.out) / "ckpt.pt").exists():
        raise TrainError(f"{args.out} already holds a run; pass --resume to continue it or --out for a new one")
    if not 0 <= args.r_t0 <= 1 or not 0 <= args.mask_ratio < 1 or not 0 <= args.mask_ratio_t0 < 1:
        raise TrainError("--r-t0 must be in [0, 1] and the mask ratios in [0, 1)")
    if args.r_t0 > 0 and args.mask_ratio_t0 == 0:
        raise TrainError("the noise-free step (--r-t0 > 0) needs --mask-ratio-t0 > 0: it predicts masked patches")
    if args.epochs <= 0 or args.batch_size <= 0 or args.lr <= 0 or args.log_every <= 0:
        raise TrainError("--epochs, --batch-size, --lr and --log-every must be positive")
    if args.max_steps is not None and args.max_steps < 1:
        raise TrainError("--max-steps must be at least 1")
    if args.patch_size < 1 or args.img_size % args.patch_size:
        raise TrainError(f"--patch-size {args.patch_size} must divide the image size {args.img_size} (e.g. 2, 4, 8)")
    return args


def _parse(line):  # a log line, or None for a half-written one (a crash mid-write)
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def setup_device(args):
    """(device, rank, world). Under torchrun: one process per GPU (NCCL), or gloo on CPUs."""
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise TrainError("--device cuda but no CUDA device is available; use --device cpu")
    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    rank, world = 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", torch.cuda.current_device()), rank, world
    return torch.device("cpu"), rank, world


def save_atomic(obj, path):
    """Write to a temp file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f) if not isinstance(obj, str) else f.write(obj.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(Path(path).parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stop_on_signal():
    """Ctrl-C (or SIGTERM) sets a flag: the loop finishes its step, saves and exits cleanly.
    A second Ctrl-C aborts at once; the last checkpoint on disk stays intact either way."""
    stop = {"signal": False}

    def handler(signum, frame):
        stop["signal"] = True
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then cosine decay to 0 at the end of --epochs."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def build(args, ds, device, ckpt):
    """The network (fresh, fine-tune init, or resumed), its EMA, and AdamW."""
    torch.manual_seed(derive_seed(args.seed, 6))
    source = Path(args.out) / "ckpt.pt" if ckpt is not None else args.finetune
    try:  # a checkpoint whose config or weights cannot make a model: one clear line
        if ckpt is not None:  # resume: the weights are loaded below, with the optimizer
            model = UMDModel(**ckpt["config"]["model"])
        elif args.finetune:  # pre-trained weights + a fresh label embedding (num_classes + 1 rows)
            pre = read_checkpoint(args.finetune)
            model = UMDModel(**{**pre["config"]["model"], "num_classes": ds.num_classes})
            label = ("y_embed.", "y_mlp.")
            missing, unexpected = model.load_state_dict(
                {k: v for k, v in pre["model"].items() if not k.startswith(label)}, strict=False)
            if unexpected or any(not k.startswith(label) for k in missing):
                raise ValueError("its weights do not match its model config")
    except (RuntimeError, TypeError, ValueError) as e:  # RuntimeError: a weight of the wrong shape
        raise CheckpointError(f"{source}: cannot build its model ({str(e).splitlines()[0]})")
    if ckpt is None and not args.finetune:  # flags were checked in resolve()
        model = UMDModel(args.model, args.patch_size, ds.train_x.shape[-1], ds.train_x.shape[1])
    if model.config["img_size"] != ds.train_x.shape[-1]:
        raise TrainError(f"the model takes {model.config['img_size']}px images but the data are {ds.train_x.shape[-1]}px")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    groups = [dict(params=[p for n, p in model.named_parameters() if not no_decay(n)], weight_decay=args.weight_decay),
              dict(params=[p for n, p in model.named_parameters() if no_decay(n)], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
    return model, ema, opt


def train(args):
    args = resolve(args)
    device, rank, world = setup_device(args)
    main_proc, out = rank == 0, Path(args.out)
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if main_proc else (lambda *a: None)
    # resolved here and not stored in args: a resumed run decides again for the machine it is on
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    amp = args.amp or ("off" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type == "cpu":
        raise TrainError("--amp fp16 needs CUDA; use --amp bf16 or off on the CPU")
    ds = load_dataset_once(args.dataset, args.data_dir, args.img_size, rank, world)
    ckpt = read_checkpoint(out / "ckpt.pt", device) if args.resume else None
    model, ema, opt = build(args, ds, device, ckpt)
    conditional = model.num_classes is not None
    batches = Batches(ds.train_x, ds.train_y, args.batch_size, args.seed, device, args.min_area, rank, world)
    spe = batches.steps_per_epoch
    total = round(args.epochs * spe)
    if total < 1:
        raise TrainError(f"--epochs {args.epochs} is less than one step of {spe} per epoch; train longer")
    stop_at = min(total, args.max_steps) if args.max_steps is not None else total
    warmup, peak_lr = round(args.warmup_epochs * spe), args.lr * args.batch_size / 256
    step = ckpt["step"] if ckpt else 0
    alphas_cumprod = cosine_alphas_cumprod().to(device)

    n0 = noise_free_share(args.batch_size, args.r_t0, rank, world)
    # a rank with no noise-free image and no masking (dit / maskdit fine-tunes) never uses the mask
    # token; the last rank has the smallest share
    unused = noise_free_share(args.batch_size, args.r_t0, world - 1, world) == 0 and args.mask_ratio == 0
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=unused) if world > 1 else model
    if use_compile:  # static shapes: the two groups of a step have fixed token counts
        net = torch.compile(net, dynamic=False)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if ckpt and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    gen = torch.Generator(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    probe = QuickProbe(ds) if main_proc and args.probe_every > 0 else None
    probe_t = 50 if args.r_t0 == 0 else None  # dit/maskdit never see clean images: read x_t at t=50
    probe_steps = max(1, round(args.probe_every * spe)) if probe else 0

    def checkpoint():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step, "epoch": step / spe,
                "config": {"model": model.config, "train": vars(args)}}

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        info = dict(vars(args), compile=use_compile, amp=amp, world_size=world, device=str(device),
                    steps_per_epoch=spe, total_steps=total, params=sum(p.numel() for p in params),
                    torch=torch.__version__)
        save_atomic(json.dumps(info, indent=2) + "\n", out / "config.json")
        if args.resume and (out / "log.jsonl").exists():  # drop lines logged after the checkpoint was written
            records = [r for r in map(_parse, (out / "log.jsonl").read_text().splitlines()) if r and r["step"] <= step]
            save_atomic("".join(json.dumps(r) + "\n" for r in records), out / "log.jsonl")
        say(f"{args.method}: {model.config['size']}/p{model.config['patch_size']}, {info['params'] / 1e6:.2f}M params, "
            f"{'conditional, ' if conditional else ''}batch {args.batch_size} on {world}x {device}, amp {amp}, "
            f"compile {use_compile}; steps {step} -> {stop_at} of {total} ({spe}/epoch); writing {out}")
    log_file = open(out / "log.jsonl" if main_proc else os.devnull, "a")

    def write_log(rec):
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    def run_probe(rec):  # in-place: adds the probe numbers to this step's log record
        t0 = time.time()
        if step == 0:
            rec["probe_pixels"] = probe()
        rec["probe"] = probe(model, probe_t)
        rec["probe_ema"] = probe(ema, probe_t)
        say(f"step {step}: {probe.train_y.numel()}-image ridge probe {100 * rec['probe']:.2f}% (EMA "
            f"{100 * rec['probe_ema']:.2f}%{', pixels %.2f%%' % (100 * rec['probe_pixels']) if 'probe_pixels' in rec else ''}"
            f"{', t=50' if probe_t else ''}) in {time.time() - t0:.1f}s")

    with stop_on_signal() as stop, log_file:
        if probe and step == 0:  # the untrained network and raw pixels: the numbers to beat
            rec = {"step": 0, "epoch": 0.0}
            run_probe(rec)
            write_log(rec)
        zero = torch.zeros((), device=device)
        sums = torch.zeros(3, device=device)  # loss, loss_t0, loss_t since the last log (no per-step sync)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        n_logged, t_log, t_ckpt, last_loss = 0, time.time(), time.time(), float("nan")
        bar = tqdm(total=stop_at, initial=step, disable=not main_proc, desc=out.name, unit="step", dynamic_ncols=True)
        while step < stop_at:
            lr = lr_at(step, total, warmup, peak_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            gen.manual_seed(derive_seed(args.seed, 1, step, rank))
            x0, y = batches.get(step, gen)
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                loss, stats = umd_loss(net, x0, r_t0=args.r_t0, n0=n0, mask_ratio=args.mask_ratio,
                                       mask_ratio_t0=args.mask_ratio_t0, alphas_cumprod=alphas_cumprod, y=y if conditional else None,
                                       label_dropout=args.label_dropout, generator=gen)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # EMA, warmed up so that short runs still get a useful average
                torch._foreach_lerp_(ema_params, params, 1 - min(args.ema_decay, (1 + step) / (10 + step)))
                sums += torch.stack([loss.detach(), stats.get("loss_t0", zero), stats.get("loss_t", zero)])
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step + 1, bad_step)
            step += 1
            n_logged += 1
            bar.update(1)

            probe_due = probe_steps and step % probe_steps == 0
            if not (step % args.log_every == 0 or step == stop_at or probe_due or (stop["signal"] and world == 1)):
                continue
            # ---- log point: the only place the host waits for the device
            if world > 1:
                flags = torch.tensor([float(stop["signal"])], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                dist.all_reduce(sums)
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                stop["signal"] = bool(flags.item())
                sums /= world
            if bad_step.item() >= 0:
                raise TrainError(f"the loss became non-finite at step {bad_step.item()}; stopped. The last good checkpoint "
                                 f"({out / 'ckpt.pt'}) is kept; try a lower --lr or --amp off")
            elapsed = time.time() - t_log
            s = (sums / n_logged).tolist()
            rec = {"step": step, "epoch": round(step / spe, 4), "loss": s[0]}
            rec.update({k: v for k, v in (("loss_t0", s[1]), ("loss_t", s[2])) if k in stats})
            rec.update(lr=lr, img_per_s=n_logged * args.batch_size / elapsed)
            last_loss = s[0]
            if probe and (probe_due or step == stop_at):
                run_probe(rec)
            write_log(rec)
            bar.set_postfix(loss=f"{s[0]:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            if main_proc and (step == stop_at or stop["signal"] or time.time() - t_ckpt > 60 * args.ckpt_minutes):
                save_atomic(checkpoint(), out / "ckpt.pt")
                t_ckpt = time.time()
            sums.zero_()
            n_logged, t_log = 0, time.time()  # probe and checkpoint time is not training time
            if stop["signal"]:
                bar.close()
                say(f"interrupted at step {step}: checkpoint saved to {out / 'ckpt.pt'}; continue with --resume --out {out}")
                return 130
    bar.close()
    if main_proc:  # a picture to look at: masked and noised test images and what the EMA model predicts
        grid, ncol = reconstruction_rows(ema, to_float(ds.test_x[:8].to(device)))
        save_grid(grid, out / "reconstruction.png", ncol)
    say(f"done: step {step} ({step / spe:.2f} epochs), loss {last_loss:.4f}; {out / 'ckpt.pt'}, {out / 'reconstruction.png'}")
    return 0


def main(argv=None):
    try:
        code = train(get_args(argv))
    except (DataError, CheckpointError, TrainError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
