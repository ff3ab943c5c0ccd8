"""Pre-train UMD (or MAE, DiT, MaskDiT: settings of the same step) on CIFAR-10, or fine-tune a
pre-trained checkpoint into a class-conditional generator.

    python train.py --dataset cifar10                      # UMD: GPU recipe with CUDA, else CPU
    python train.py --method dit                           # another method
    python train.py --finetune runs/umd-small-p2/ckpt.pt   # class-conditional fine-tune
    python train.py --resume --out runs/umd-small-p2       # continue exactly where it stopped
    torchrun --nproc_per_node 8 train.py                   # several GPUs (DDP)

References: UMD, arXiv 2406.17688, and its official recipe (github.com/philippe-eecs/small-vision,
big_vision/configs/ae_i1k.py, big_vision/trainers/train_ae.py); the loop's shape follows
facebookresearch/DiT and karpathy/nanoGPT (train.py).
"""
import copy
import math
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import NOISY_READOUT_T, ConfigError, get_args, resolve
from corruption import cosine_alphas_cumprod, umd_loss
from data import Batches, DataError, Stream, derive_seed, load_dataset_once, to_float
from devices import noise_free_share, setup_device, wrap
from machinery import (CheckpointError, FlagError, Run, TrainError, check_same_data, checkpoint,
                       claim, command_line, read_checkpoint)
from model import UMDModel, param_groups
from probe import QuickProbe
from sample import reconstruction_rows, save_grid


def build(args, ds, device, resumed):
    """The network (fresh, pre-trained + a fresh label embedding, or resumed), its EMA, AdamW."""
    torch.manual_seed(derive_seed(args.seed, Stream.INIT))
    source = f"{args.out}/ckpt.pt" if resumed is not None else args.finetune
    try:  # a checkpoint whose config or weights cannot make a model: one clear line
        if resumed is not None:  # its weights are loaded below, with the optimizer
            model = UMDModel(**resumed["config"]["model"])
        elif args.finetune:  # the raw pre-trained weights (as officially) + a fresh label branch
            pre = read_checkpoint(args.finetune)
            model = UMDModel(**{**pre["config"]["model"], "num_classes": ds.num_classes})
            missing, unexpected = model.load_state_dict(pre["model"], strict=False)
            if unexpected or any(not k.startswith(("y_embed.", "y_mlp.")) for k in missing):
                raise ValueError("its weights do not match its model config")
        else:
            model = UMDModel(args.model, args.patch_size, img_size=ds.train_x.shape[-1],
                             channels=ds.train_x.shape[1])
    except (RuntimeError, TypeError, ValueError) as e:  # RuntimeError: a weight of the wrong shape
        raise CheckpointError(f"{source}: cannot build its model ({str(e).splitlines()[0]})")
    if model.config["img_size"] != ds.train_x.shape[-1]:
        raise TrainError(f"the model takes {model.config['img_size']}px images "
                         f"but the data are {ds.train_x.shape[-1]}px")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts at the loaded weights
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, args.beta2), fused=device.type == "cuda")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
    return model, ema, opt


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then cosine decay to 0 at the end of the schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def ema_decay_at(step, args):
    """Pre-training warms the EMA up, so that short runs still average recent weights; the
    fine-tune uses its fixed decay from the first step."""
    return min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay


@torch.no_grad()
def update_ema(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1 - decay)  # ema <- decay * ema + (1 - decay) * params


def train(args):
    args = resolve(args)
    device, rank, world = setup_device(args.device)
    main_process = rank == 0
    say = tqdm.write if main_process else (lambda *a: None)
    lock = claim(args.out) if main_process else None  # one run per folder
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    amp = args.amp or ("off" if device.type == "cpu" else
                       "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type == "cpu":
        raise TrainError("--amp fp16 needs CUDA; use --amp bf16 or off on the CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    # the data; every step's batch is rebuilt from (seed, step) alone, so resume is exact
    ds = load_dataset_once(args.dataset, args.data_dir, args.img_size, rank, world)
    batches = Batches(ds.train_x, ds.train_y, args.batch_size, args.seed, device, args.min_area,
                      rank, world)
    data = dict(num_classes=ds.num_classes, train_images=len(ds.train_x),
                img_size=ds.train_x.shape[-1])
    steps_per_epoch = batches.steps_per_epoch
    total_steps = round(args.epochs * steps_per_epoch)
    if total_steps < 1:
        raise TrainError(f"--epochs {args.epochs} is less than one step of {steps_per_epoch} "
                         "per epoch; train longer")
    stop_step = min(total_steps, args.max_steps or total_steps)
    warmup_steps, peak_lr = round(args.warmup * total_steps), args.lr * args.batch_size / 256

    # the model, its EMA and the optimizer; compile and AMP follow the machine the run is on now
    resumed = read_checkpoint(f"{args.out}/ckpt.pt", device) if args.resume else None
    if resumed:
        check_same_data(resumed, data, args.out)
    model, ema, opt = build(args, ds, device, resumed)
    step = resumed["step"] if resumed else 0
    conditional = model.num_classes is not None
    n0 = noise_free_share(args.batch_size, args.r_t0, rank, world)  # this rank's noise-free images
    # the last rank has the fewest noise-free images; with none and no masking, the mask token
    # gets no gradient there, and DDP must be told
    idle_mask_token = (noise_free_share(args.batch_size, args.r_t0, world - 1, world) == 0
                       and args.mask_ratio == 0)
    net = wrap(model, device, world, use_compile, idle_mask_token)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # loss scaling, fp16 only
    if resumed and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    alphas_cumprod = cosine_alphas_cumprod().to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    gen = torch.Generator(device)
    probe = QuickProbe(ds) if main_process and args.probe_every > 0 else None
    probe_t = NOISY_READOUT_T if args.r_t0 == 0 else None  # dit/maskdit never saw a clean image
    # every rank stops at the probe steps (log points hold collectives); rank 0 probes
    probe_steps = max(1, round(args.probe_every * steps_per_epoch)) if args.probe_every > 0 else 0

    n_params = sum(p.numel() for p in params)
    info = dict(vars(args), compile=use_compile, amp=amp, world_size=world, device=str(device),
                steps_per_epoch=steps_per_epoch, total_steps=total_steps, params=n_params,
                torch=torch.__version__, step=step, data=data)
    if args.recipe == "cpu" and not args.resume:
        say(f"{'on the CPU: ' if device.type == 'cpu' else ''}the CPU "
            f"{'fine-tune ' if args.finetune else ''}recipe fills every flag not given; "
            "--recipe gpu for the official hyper-parameters")
    say(f"{args.method}: {args.model}/p{args.patch_size}, {n_params / 1e6:.2f}M params, "
        f"{'conditional, ' if conditional else ''}batch {args.batch_size} on {world}x {device}, "
        f"peak lr {peak_lr:.3g}, amp {amp}, compile {use_compile}; steps {step} -> {stop_step} "
        f"of {total_steps} ({steps_per_epoch}/epoch); writing {args.out}")

    rec = {"loss": float("nan")}
    with Run(args.out, lock, info, args.resume, world, device, stop_step) as run:
        if probe and step == 0:  # the untrained network and raw pixels: the numbers to beat
            run.log({"step": 0, "epoch": 0.0, **probe.report(model, ema, probe_t, 0)})
        while step < stop_step:
            # the step's learning rate and randomness come from (seed, step) alone
            lr = lr_at(step, total_steps, warmup_steps, peak_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            gen.manual_seed(derive_seed(args.seed, Stream.STEP, step, rank))
            x0, y = batches.get(step, gen)

            # forward: the UMD loss of the noise-free and the mixed group (corruption.py)
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                loss, stats = umd_loss(net, x0, r_t0=args.r_t0, n0=n0, mask_ratio=args.mask_ratio,
                                       mask_ratio_t0=args.mask_ratio_t0,
                                       alphas_cumprod=alphas_cumprod,
                                       y=y if conditional else None,
                                       label_dropout=args.label_dropout, generator=gen)
            # backward, clip, optimizer step, EMA
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            update_ema(ema_params, params, ema_decay_at(step, args))
            run.add(step, loss, stats)
            step += 1

            # log, probe and save at log points only: nowhere else does the host wait
            probe_due = probe_steps > 0 and (step % probe_steps == 0 or step == stop_step)
            if run.at_log_point(step % args.log_every == 0 or step == stop_step or probe_due):
                rec = run.losses(step, lr, args.batch_size)
                if probe and probe_due:
                    rec.update(probe.report(model, ema, probe_t, step))
                run.log(rec)
                if step == stop_step or run.save_due(args.ckpt_minutes):
                    run.save(checkpoint(model, ema, opt, scaler, step, steps_per_epoch, args, data))
                run.meter.restart()
                if run.stop:
                    return run.interrupted(step)

    # a picture to look at: masked and noised test images and what the EMA model predicts
    if main_process:
        grid, ncol = reconstruction_rows(ema, to_float(ds.test_x[:8].to(device)))
        save_grid(grid, f"{args.out}/reconstruction.png", ncol)
    say(f"done: step {step} ({step / steps_per_epoch:.2f} epochs), loss {rec['loss']:.4f}; "
        f"{args.out}/ckpt.pt, {args.out}/reconstruction.png")
    return 0


def main(argv=None):
    errors = (DataError, CheckpointError, ConfigError, TrainError, FlagError)
    try:
        code = command_line("train.py", lambda: train(get_args(argv)), errors)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
