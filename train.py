"""Pre-train UMD (or MAE, DiT, MaskDiT: settings of the same step) on CIFAR-10, or fine-tune a
pre-trained checkpoint into a class-conditional generator.

    python train.py --dataset cifar10                      # UMD: GPU recipe with CUDA, else CPU
    python train.py --method dit                           # another method
    python train.py --finetune runs/umd-tiny-p4/ckpt.pt    # class-conditional fine-tune
    python train.py --resume --out runs/umd-tiny-p4        # continue exactly where it stopped
    python train.py --recipe gpu --grad-accum 4            # the recipe's batch on a smaller GPU
    torchrun --nproc_per_node 8 train.py                   # several GPUs (DDP)

The loop comes first; below it, how the run is built (setup). References: UMD, arXiv 2406.17688,
and its official recipe (github.com/philippe-eecs/small-vision, big_vision/configs/ae_i1k.py,
big_vision/trainers/train_ae.py); the loop's shape follows facebookresearch/DiT and
karpathy/nanoGPT (train.py, gradient_accumulation_steps).
"""
import copy
import math
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import NOISY_READOUT_T, ConfigError, get_args, resolve
from corruption import cosine_alphas_cumprod, umd_loss
from data import Batches, DataError, Stream, derive_seed, load_dataset_once, to_float
from devices import (autocast, micro_batches, noise_free_share, precision, setup_device,
                     sync_grads, wrap)
from machinery import (FlagError, Run, TrainError, check_same_data, checkpoint, claim,
                       command_line)
from model import CheckpointError, UMDModel, param_groups, read_checkpoint
from probe import QuickProbe
from sample import reconstruction_rows, save_grid


def train(args):
    """Train until the run's last step (or a Ctrl-C); the run itself is built by setup()."""
    r = setup(resolve(args))
    a, step = r.args, r.start_step
    with r.run:
        while step < r.stop_step:
            # the step's learning rate and randomness come from (seed, step) alone
            lr = lr_at(step, r.total_steps, r.warmup_steps, r.peak_lr)
            for group in r.opt.param_groups:
                group["lr"] = lr

            # forward and backward of each micro-batch (one, unless --grad-accum): micro-batch i
            # takes the images, noise-free share and random draws of the DDP rank it stands for
            losses = []
            for part in r.parts:
                r.gen.manual_seed(derive_seed(a.seed, Stream.STEP, step, part.rank))
                x0, y = r.batches.get(step, r.gen, part.rank)
                with sync_grads(r.net, part.last):  # DDP: gradients averaged at the last one
                    with autocast(r.device, r.amp):
                        loss, stats = umd_loss(r.net, x0, r_t0=a.r_t0, n0=part.n0,
                                               mask_ratio=a.mask_ratio,
                                               mask_ratio_t0=a.mask_ratio_t0,
                                               alphas_cumprod=r.alphas_cumprod,
                                               y=y if r.conditional else None,
                                               label_dropout=a.label_dropout, generator=r.gen)
                    r.scaler.scale(loss / len(r.parts)).backward()  # gradients add up
                losses.append((loss, stats))

            # clip, optimizer step, EMA
            r.scaler.unscale_(r.opt)
            torch.nn.utils.clip_grad_norm_(r.params, a.grad_clip)
            r.scaler.step(r.opt)
            r.scaler.update()
            r.opt.zero_grad(set_to_none=True)
            update_ema(r.ema_params, r.params, ema_decay_at(step, a))
            step += 1

            # log, probe and save at log points only: nowhere else does the host wait
            stop = r.run.end_step(step, lr, losses)  # True once a Ctrl-C's checkpoint is saved
            if stop:
                return r.run.interrupted(step)
        r.finish()
    return 0


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


# ---------------------------------------------------------------------------- building the run
def setup(args):
    """Everything the loop uses: the device and its precision, the data, the network, its EMA and
    AdamW (fresh, fine-tuned or resumed), the micro-batches, and the run folder."""
    device, rank, world = setup_device(args.device)
    main_process = rank == 0
    say = tqdm.write if main_process else (lambda *a: None)
    # each micro-batch is one (virtual) rank's share: checked before any work
    parts = micro_batches(args.batch_size, args.r_t0, rank, world, args.grad_accum)
    lock = claim(args.out) if main_process else None  # one run per folder
    amp, use_compile, why = precision(device, args.amp, args.compile)

    # the data; every step's batch is rebuilt from (seed, step) alone, so resume is exact
    ds = load_dataset_once(args.dataset, args.data_dir, args.img_size, rank, world)
    batches = Batches(ds.train_x, ds.train_y, args.batch_size, args.seed, device, args.min_area,
                      world * args.grad_accum)
    data = dict(num_classes=ds.num_classes, train_images=len(ds.train_x),
                img_size=ds.train_x.shape[-1])
    steps_per_epoch = batches.steps_per_epoch
    total_steps = round(args.epochs * steps_per_epoch)
    if total_steps < 1:
        raise TrainError(f"--epochs {args.epochs} is less than one step of {steps_per_epoch} "
                         "per epoch; train longer")
    stop_step = min(total_steps, args.max_steps or total_steps)

    # the model, its EMA and the optimizer; compile and AMP follow the machine the run is on now
    resumed = read_checkpoint(f"{args.out}/ckpt.pt", device) if args.resume else None
    if resumed:
        check_same_data(resumed, data, args.out)
    model, ema, opt = build(args, ds, device, resumed)
    # the last rank has the fewest noise-free images; with none and no masking, the mask token
    # gets no gradient there, and DDP must be told
    last = world * args.grad_accum - 1
    idle_mask_token = (noise_free_share(args.batch_size, args.r_t0, last, last + 1) == 0
                       and args.mask_ratio == 0)
    net = wrap(model, device, world, use_compile, idle_mask_token)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # loss scaling, fp16 only
    if resumed and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])

    # the in-training probe (rank 0; every rank stops at its steps, as log points hold collectives)
    probe = QuickProbe(ds) if main_process and args.probe_every > 0 else None
    probe_t = NOISY_READOUT_T if args.r_t0 == 0 else None  # dit/maskdit never saw a clean image
    probe_steps = max(1, round(args.probe_every * steps_per_epoch)) if args.probe_every > 0 else 0

    step = resumed["step"] if resumed else 0
    n_params = sum(p.numel() for p in model.parameters())
    peak_lr = args.lr * args.batch_size / 256
    info = dict(vars(args), compile=use_compile, amp=amp, world_size=world, device=str(device),
                steps_per_epoch=steps_per_epoch, total_steps=total_steps, params=n_params,
                torch=torch.__version__, step=step, data=data)
    if args.recipe == "cpu" and not args.resume:
        say(f"{'on the CPU: ' if device.type == 'cpu' else ''}the CPU "
            f"{'fine-tune ' if args.finetune else ''}recipe fills every flag not given; "
            "--recipe gpu for the official hyper-parameters")
    accum = f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else ""
    say(f"{args.method}: {args.model}/p{args.patch_size}, {n_params / 1e6:.2f}M params, "
        f"{'conditional, ' if model.num_classes is not None else ''}batch {args.batch_size}"
        f"{accum} on {world}x {device}, peak lr {peak_lr:.3g}, amp {amp}, compile {use_compile} "
        f"({why}); steps {step} -> {stop_step} of {total_steps} ({steps_per_epoch}/epoch); "
        f"writing {args.out}")
    run = Run(args.out, lock, info, args.resume, world, device, stop_step,
              probe=probe and (lambda at: probe.report(model, ema, probe_t, at)),
              probe_steps=probe_steps,
              state=lambda at: checkpoint(model, ema, opt, scaler, at, steps_per_epoch, args,
                                          data))

    def finish():  # a picture to look at: test images corrupted as the run's method does
        if main_process:
            x0 = to_float(ds.test_x[:8].to(device))
            grid, ncol = reconstruction_rows(ema, x0, args.r_t0, args.mask_ratio_t0,
                                             args.mask_ratio)
            save_grid(grid, f"{args.out}/reconstruction.png", ncol)
        say(f"done: step {stop_step} ({stop_step / steps_per_epoch:.2f} epochs), loss "
            f"{run.last_loss:.4f}; {args.out}/ckpt.pt, {args.out}/reconstruction.png")

    return SimpleNamespace(
        args=args, device=device, amp=amp, batches=batches, parts=parts, model=model, net=net,
        opt=opt, scaler=scaler, params=list(model.parameters()),
        ema_params=list(ema.parameters()), gen=torch.Generator(device),
        alphas_cumprod=cosine_alphas_cumprod().to(device),
        conditional=model.num_classes is not None,
        start_step=step, stop_step=stop_step, total_steps=total_steps,
        warmup_steps=round(args.warmup * total_steps), peak_lr=peak_lr, run=run, finish=finish)


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
