"""Pre-train UMD (or MAE, DiT, MaskDiT: settings of the same step) on CIFAR-10, or fine-tune a
pre-trained checkpoint into a class-conditional generator.

    python train.py --dataset cifar10                      # UMD; the GPU recipe with CUDA, else the CPU one
    python train.py --method dit --recipe gpu              # another method, the official recipe
    python train.py --finetune runs/umd-small-p2/ckpt.pt   # class-conditional fine-tune
    python train.py --resume --out runs/umd-small-p2       # continue exactly where it stopped
    torchrun --nproc_per_node 8 train.py                   # several GPUs (DDP)

References:
  UMD: arXiv 2406.17688; the official recipe: github.com/philippe-eecs/small-vision,
      big_vision/configs/ae_i1k.py and big_vision/trainers/train_ae.py
  the loop's shape: github.com/facebookresearch/DiT train.py, github.com/karpathy/nanoGPT train.py
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

from config import NOISY_READOUT_T, ConfigError, get_args, resolve
from corruption import cosine_alphas_cumprod, noise_free_share, umd_loss
from data import Batches, DataError, Stream, derive_seed, load_dataset_once, to_float
from model import CheckpointError, UMDModel, no_decay, read_checkpoint, save_atomic
from probe import QuickProbe
from sample import reconstruction_rows, save_grid


class TrainError(Exception):
    """A run that cannot start or go on (data too small, a non-finite loss): one line, exit 2."""


# ----------------------------------------------------------------------------- setup
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


def build(args, ds, device, resumed):
    """The network (fresh, pre-trained + a fresh label embedding, or resumed), its EMA, AdamW."""
    torch.manual_seed(derive_seed(args.seed, Stream.INIT))
    source = Path(args.out) / "ckpt.pt" if resumed is not None else args.finetune
    try:  # a checkpoint whose config or weights cannot make a model: one clear line
        if resumed is not None:  # the weights are loaded below, with the optimizer
            model = UMDModel(**resumed["config"]["model"])
        elif args.finetune:  # pre-trained weights + a fresh label embedding (num_classes + 1 rows)
            pre = read_checkpoint(args.finetune)
            model = UMDModel(**{**pre["config"]["model"], "num_classes": ds.num_classes})
            label = ("y_embed.", "y_mlp.")
            missing, unexpected = model.load_state_dict(
                {k: v for k, v in pre["model"].items() if not k.startswith(label)}, strict=False)
            if unexpected or any(not k.startswith(label) for k in missing):
                raise ValueError("its weights do not match its model config")
        else:
            model = UMDModel(args.model, args.patch_size, img_size=ds.train_x.shape[-1], channels=ds.train_x.shape[1])
    except (RuntimeError, TypeError, ValueError) as e:  # RuntimeError: a weight of the wrong shape
        raise CheckpointError(f"{source}: cannot build its model ({str(e).splitlines()[0]})")
    if model.config["img_size"] != ds.train_x.shape[-1]:
        raise TrainError(f"the model takes {model.config['img_size']}px images but the data are {ds.train_x.shape[-1]}px")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # the fine-tune EMA starts at the loaded weights
    groups = [dict(params=[p for n, p in model.named_parameters() if not no_decay(n)], weight_decay=args.weight_decay),
              dict(params=[p for n, p in model.named_parameters() if no_decay(n)], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
    return model, ema, opt


def wrap(model, args, device, world, use_compile, n0_last_rank):
    """DDP (several processes) and torch.compile around the same weights."""
    if world > 1:
        # A rank runs one forward per group it holds: two, or one where it has no noise-free
        # images. Ranks may differ, so DDP must not talk in forward: the model has no buffers to
        # sync (model.py, condition). DDP also waits in backward for a gradient of every
        # parameter; the mask token gets none on a rank with nothing masked (no noise-free images
        # and mask_ratio 0: dit, the fine-tunes). static_graph learns in the first step which
        # parameters a rank leaves unused (find_unused_parameters walks only the last forward's
        # graph, and fails with two forwards).
        unused = n0_last_rank == 0 and args.mask_ratio == 0
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=unused)
    if use_compile:  # static shapes: each group of a UMD step has a fixed token count, so 2 graphs
        model = torch.compile(model, dynamic=False)
    return model


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then cosine decay to 0 at the end of the schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def ema_decay_at(step, args):
    """Pre-training (ours; the official code keeps no EMA there): warmed up as
    min(decay, (1 + step) / (10 + step)), so that short runs still average recent weights.
    Fine-tune (official): the fixed decay from the first step."""
    return min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, as one fused update over all tensors."""
    torch._foreach_lerp_(ema_params, params, 1 - decay)


class LossMeter:
    """Sums of the losses since the last log point, kept on the device, and the first step whose
    loss was not finite. Read only at log points: there (and in the DDP stop-flag sync beside
    it) and nowhere else the host waits for the device."""

    def __init__(self, device):
        self.zero = torch.zeros((), device=device)
        self.sums = torch.zeros(3, device=device)    # loss, loss_t0, loss_t
        self.counts = torch.zeros(3, device=device)  # steps that had each (a DDP rank may have no noise-free images)
        self.present = None
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.restart()

    def restart(self):
        """Start a new log interval (probes and checkpoints are not training time)."""
        self.sums.zero_()
        self.counts.zero_()
        self.steps, self.start = 0, time.time()

    @torch.no_grad()
    def add(self, step, loss, stats):
        loss = loss.detach()
        if self.present is None:  # which groups this rank has is the same at every step
            self.present = torch.tensor([1.0, "loss_t0" in stats, "loss_t" in stats], device=self.sums.device)
        self.sums += torch.stack([loss, stats.get("loss_t0", self.zero), stats.get("loss_t", self.zero)])
        self.counts += self.present
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), step + 1, self.bad_step)
        self.steps += 1

    def read(self, world):
        """(mean loss, loss_t0, loss_t over the interval and the ranks, steps, seconds, bad step)."""
        if world > 1:
            for t in (self.sums, self.counts):
                dist.all_reduce(t)
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        return means, self.steps, time.time() - self.start, self.bad_step.item()


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


def save_checkpoint(path, model, ema, opt, scaler, step, steps_per_epoch, args):
    """Everything --resume needs, and a config that rebuilds the model with no flags."""
    save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                 "epoch": step / steps_per_epoch, "config": {"model": model.config, "train": vars(args)}}, path)


def start_run_dir(out, info, step, resumed):
    """config.json, and the log: empty for a new run (an earlier attempt may have left one), and
    on resume without the lines written after the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(info, indent=2) + "\n", out / "config.json")
    log = out / "log.jsonl"
    records = [r for r in map(parse_log_line, log.read_text().splitlines()) if r and r["step"] <= step] \
        if resumed and log.exists() else []
    save_atomic("".join(json.dumps(r) + "\n" for r in records), log)


def write_log(f, rec):
    f.write(json.dumps(rec) + "\n")
    f.flush()


def parse_log_line(line):  # a log record, or None for a half-written one (a crash mid-write)
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------- training
def train(args):
    auto_recipe = args.recipe in (None, "auto") and not args.resume
    args = resolve(args)

    # Setup the device and DDP; compile and AMP are decided for the machine the run is on now
    device, rank, world = setup_device(args)
    main_process, out = rank == 0, Path(args.out)
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if main_process else (lambda *a: None)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    amp = args.amp or ("off" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type == "cpu":
        raise TrainError("--amp fp16 needs CUDA; use --amp bf16 or off on the CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    # Load the data; every step's batch is rebuilt from (seed, step) alone (data.py Batches)
    ds = load_dataset_once(args.dataset, args.data_dir, args.img_size, rank, world)
    batches = Batches(ds.train_x, ds.train_y, args.batch_size, args.seed, device, args.min_area, rank, world)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = round(args.epochs * steps_per_epoch)
    if total_steps < 1:
        raise TrainError(f"--epochs {args.epochs} is less than one step of {steps_per_epoch} per epoch; train longer")
    stop_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    warmup_steps, peak_lr = round(args.warmup * total_steps), args.lr * args.batch_size / 256

    # Create the model, its EMA and the optimizer
    resumed = read_checkpoint(out / "ckpt.pt", device) if args.resume else None
    model, ema, opt = build(args, ds, device, resumed)
    step = resumed["step"] if resumed else 0
    conditional = model.num_classes is not None
    n0 = noise_free_share(args.batch_size, args.r_t0, rank, world)  # this rank's noise-free images
    n0_last_rank = noise_free_share(args.batch_size, args.r_t0, world - 1, world)  # the smallest share
    net = wrap(model, args, device, world, use_compile, n0_last_rank)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # loss scaling, for fp16 only
    if resumed and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    alphas_cumprod = cosine_alphas_cumprod().to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    gen = torch.Generator(device)
    # every rank stops at the probe steps (they are log points, with collectives); rank 0 probes
    probe = QuickProbe(ds) if main_process and args.probe_every > 0 else None
    probe_t = NOISY_READOUT_T if args.r_t0 == 0 else None  # dit/maskdit: read x_t, never trained on clean images
    probe_steps = max(1, round(args.probe_every * steps_per_epoch)) if args.probe_every > 0 else 0

    # Start the run directory and say what runs
    n_params = sum(p.numel() for p in params)
    if main_process:
        info = dict(vars(args), compile=use_compile, amp=amp, world_size=world, device=str(device),
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, params=n_params, torch=torch.__version__)
        start_run_dir(out, info, step, args.resume)
    if auto_recipe and device.type == "cpu":  # say which recipe filled in the unset flags, and why
        kind = "fine-tune recipe" if args.finetune else "recipe"
        what = f"batch {args.batch_size}, {args.epochs:g} epochs, {args.model}/p{args.patch_size}"
        if args.recipe == "cpu":
            say(f"on the CPU: the CPU {kind} ({what}; README \"{'Train' if args.finetune else 'Quick start'}\"); "
                "--recipe gpu for the official hyper-parameters")
        else:
            say(f"on the CPU with a size or schedule flag: the GPU {kind} fills in the flags not given ({what}); "
                "--recipe cpu for the CPU one")
    say(f"{args.method}: {args.model}/p{args.patch_size}, {n_params / 1e6:.2f}M params, "
        f"{'conditional, ' if conditional else ''}batch {args.batch_size} on {world}x {device}, peak lr {peak_lr:.3g}, "
        f"amp {amp}, compile {use_compile}; steps {step} -> {stop_step} of {total_steps} ({steps_per_epoch}/epoch); "
        f"writing {out}")
    log_file = open(out / "log.jsonl" if main_process else os.devnull, "a")

    # Train
    meter = LossMeter(device)
    saved_step = step if resumed else None  # the step of the checkpoint on disk, for the abort message
    last_save, last_loss = time.time(), float("nan")
    bar = tqdm(total=stop_step, initial=step, disable=not main_process, desc=out.name, unit="step", dynamic_ncols=True)
    with stop_on_signal() as stop, log_file:
        if probe and step == 0:  # the untrained network and raw pixels: the numbers to beat
            write_log(log_file, {"step": 0, "epoch": 0.0, **probe.report(model, ema, probe_t, 0)})
        try:
            while step < stop_step:
                # the step's learning rate and randomness, from (seed, step) alone: resume is exact
                lr = lr_at(step, total_steps, warmup_steps, peak_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                gen.manual_seed(derive_seed(args.seed, Stream.STEP, step, rank))
                x0, y = batches.get(step, gen)

                # forward: the UMD loss of the noise-free and the mixed group (corruption.py)
                with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                    loss, stats = umd_loss(net, x0, r_t0=args.r_t0, n0=n0, mask_ratio=args.mask_ratio,
                                           mask_ratio_t0=args.mask_ratio_t0, alphas_cumprod=alphas_cumprod,
                                           y=y if conditional else None, label_dropout=args.label_dropout, generator=gen)
                # backward, clip, optimizer step, EMA
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                update_ema(ema_params, params, ema_decay_at(step, args))
                meter.add(step, loss, stats)
                step += 1
                bar.update(1)

                # Log (and probe, and save) at log points only. Under DDP every rank must reach
                # the same log points, so a Ctrl-C is acted on at the next regular one.
                probe_due = probe_steps and step % probe_steps == 0
                if not (step % args.log_every == 0 or step == stop_step or probe_due or (stop["signal"] and world == 1)):
                    continue
                if world > 1:
                    flag = torch.tensor([float(stop["signal"])], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop["signal"] = bool(flag.item())
                (last_loss, loss_t0, loss_t), n_steps, seconds, bad_step = meter.read(world)
                if bad_step >= 0:
                    raise TrainError(f"the loss became non-finite at step {bad_step}; stopped. The last good checkpoint "
                                     f"({out / 'ckpt.pt'}) is kept; try a lower --lr or --amp off")
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss}
                rec.update({k: v for k, v in (("loss_t0", loss_t0), ("loss_t", loss_t)) if k in stats})
                rec.update(lr=lr, img_per_s=n_steps * args.batch_size / seconds)
                if probe and (probe_due or step == stop_step):
                    rec.update(probe.report(model, ema, probe_t, step))
                write_log(log_file, rec)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")

                # Save
                if main_process and (step == stop_step or stop["signal"] or time.time() - last_save > 60 * args.ckpt_minutes):
                    save_checkpoint(out / "ckpt.pt", model, ema, opt, scaler, step, steps_per_epoch, args)
                    saved_step, last_save = step, time.time()
                meter.restart()
                if stop["signal"]:
                    bar.close()
                    if world > 1:  # the other ranks wait for rank 0's checkpoint: torchrun ends the job with the first
                        dist.barrier()
                    say(f"interrupted at step {step}: checkpoint saved to {out / 'ckpt.pt'}; continue with --resume --out {out}")
                    return 130
        except KeyboardInterrupt:  # a second Ctrl-C: no time to save
            bar.close()
            kept = f"{out / 'ckpt.pt'} (step {saved_step}) is kept" if saved_step is not None else "no checkpoint was written yet"
            print(f"train.py: aborted at step {step} by a second Ctrl-C; {kept}", file=sys.stderr)
            return 130
    bar.close()

    # A picture to look at: masked and noised test images and what the EMA model predicts
    if main_process:
        grid, ncol = reconstruction_rows(ema, to_float(ds.test_x[:8].to(device)))
        save_grid(grid, out / "reconstruction.png", ncol)
    say(f"done: step {step} ({step / steps_per_epoch:.2f} epochs), loss {last_loss:.4f}; "
        f"{out / 'ckpt.pt'}, {out / 'reconstruction.png'}")
    return 0


def main(argv=None):
    try:
        code = train(get_args(argv))
    except (DataError, CheckpointError, ConfigError, TrainError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which handles its own)
        print("train.py: interrupted; the last checkpoint on disk, if any, is kept", file=sys.stderr)
        code = 130
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
