"""Look at what a checkpoint learned: DDIM samples (with classifier-free guidance after a label
fine-tune), their FID, and masked-reconstruction pictures.

    python sample.py                                          # newest runs/*/ckpt.pt, 64 samples
    python sample.py --ckpt runs/umd-tiny-p4-ft/ckpt.pt --cfg-scale 2   # one row per class
    python sample.py --ckpt runs/umd-tiny-p4-ft/ckpt.pt --cfg-scale 2 --fid 10000   # FID-10k
    python sample.py --reconstruct                            # masked / noised inputs, predictions

References:
  DDIM: Song et al., arXiv 2010.02502; classifier-free guidance: Ho & Salimans, arXiv 2207.12598
  the official sampler: github.com/philippe-eecs/small-vision, big_vision/gaussian_diffusion.py
      (ddim_sample: eta 1, x0 clipped) and big_vision/trainers/train_ae.py (guided calls)
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config import METHODS
from corruption import CLEAN, cosine_alphas_cumprod, q_sample, random_masking, time_input
from data import DataError, load_dataset, to_float
from devices import autocast, pick, precision
from machinery import FlagError, check_finite, command_line, save_atomic, writable, write_json
from model import CheckpointError, load_checkpoint, unpatchify


# ---------------------------------------------------------------------------- DDIM
def ddim_timesteps(steps, T=1000):
    """S evenly spaced steps from T - 1 down, then 0: 999, 991, ..., 7, 0 for S = 125. Where S
    divides T this is the official strided sequence (999 - k * T // S); elsewhere it stays evenly
    spaced instead of jumping to 0 from far away."""
    ts = [T - 1 - (k * T) // steps for k in range(steps)]
    return ts if ts[-1] == 0 else ts + [0]


def ddim_step(x, eps, abar, abar_next, eta=1.0, noise=None):
    """One DDIM update from x_t (abar) to x_t_next (abar_next) given predicted eps. x0 is clipped
    to [-1, 1] and eps recomputed from it (as the official sampler). Returns (x_next, x0_hat)."""
    x0 = ((x - (1 - abar) ** 0.5 * eps) / abar ** 0.5).clamp(-1, 1)
    eps = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5
    sigma = eta * ((1 - abar_next) / (1 - abar)) ** 0.5 * (1 - abar / abar_next) ** 0.5
    x_next = abar_next ** 0.5 * x0 + (1 - abar_next - sigma ** 2) ** 0.5 * eps
    return (x_next if noise is None else x_next + sigma * noise), x0


def guided(model, x, t, y=None, cfg_scale=None):
    """Model output at diffusion step t. With cfg_scale s, the conditional and unconditional halves
    run as one batch: out = uncond + s * (cond - uncond)."""
    time_in = torch.full((len(x),), time_input(t), dtype=torch.long, device=x.device)
    if cfg_scale is None or y is None:
        return model(x, time_in, y)
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(torch.cat([x, x]), torch.cat([time_in, time_in]),
                         torch.cat([y, null])).chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def ddim_sample(model, shape, steps=125, y=None, cfg_scale=None, eta=1.0, generator=None,
                progress=False):
    """Samples in [-1, 1]: DDIM with eta (1.0 by default) over `steps` strided steps, eps head;
    the image is the x0 implied by the eps head at a final call at t = 0 (the official sampler)."""
    dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else None
    abar = cosine_alphas_cumprod().tolist()
    C = shape[1]
    x = torch.randn(shape, device=dev, generator=generator)
    ts = ddim_timesteps(steps)
    for t, t_next in tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not progress,
                          leave=False):
        eps = guided(model, x, t, y, cfg_scale)[:, C:].float()
        x, _ = ddim_step(x, eps, abar[t], abar[t_next], eta,
                         torch.randn(shape, device=dev, generator=generator))
    eps = guided(model, x, 0, y, cfg_scale)[:, C:].float()
    return ddim_step(x, eps, abar[0], 1.0, eta)[1]


# ---------------------------------------------------------------------------- pictures
def to_uint8(x):
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, ncol, pad=2):
    """images in [-1, 1] [N, C, H, W] -> one PNG, ncol images per row, pad pixels of white."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(imgs):
        row, col = divmod(i, ncol)
        grid[pad + row * (h + pad):pad + row * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = im
    image = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    save_atomic(lambda f: image.save(f, format="PNG"), writable(path))
    return grid.shape


@torch.no_grad()
def reconstruction_rows(model, x0, r_t0=0.5, mask_ratio_t0=0.75, mask_ratio=0.375,
                        ts=(100, 300, 500, 800), seed=0):
    """Per image, with a method's own settings: original, then where it has a noise-free step
    (r_t0 > 0) masked input | reconstruction, then where it has noisy steps (r_t0 < 1), for each
    t, noised (+ masked) input | x0 prediction. Visible pixels come from the input on the clean
    step and from the eps head on noisy steps; masked ones from the x0 head."""
    g = torch.Generator(x0.device).manual_seed(seed)
    B, C, p, L = x0.shape[0], x0.shape[1], model.patch_size, model.num_patches
    pix = lambda m: unpatchify(m[:, :, None].expand(-1, -1, p * p * C), p, C)  # [B, L] -> pixels
    cols = [x0]
    if r_t0 > 0:
        ids_keep, mask, ids_restore = random_masking(B, L, mask_ratio_t0, x0.device, g)
        out = model(x0, torch.full((B,), CLEAN, device=x0.device), ids_keep=ids_keep,
                    ids_restore=ids_restore)[:, :C]
        m = pix(mask)
        cols += [x0 * (1 - m), x0 * (1 - m) + out * m]
    abar = cosine_alphas_cumprod().to(x0.device)
    for t in ts if r_t0 < 1 else ():
        tt = torch.full((B,), t, device=x0.device)
        x_t = q_sample(x0, tt, torch.randn(x0.shape, device=x0.device, generator=g), abar)
        ids_keep, mask, ids_restore = random_masking(B, L, mask_ratio, x0.device, g)
        out = model(x_t, time_input(tt), ids_keep=ids_keep, ids_restore=ids_restore)
        a = abar[t].float()
        from_eps = (x_t - (1 - a).sqrt() * out[:, C:]) / a.sqrt()
        m = pix(mask)
        cols += [x_t * (1 - m), (from_eps * (1 - m) + out[:, :C] * m).clamp(-1, 1)]
    return torch.stack(cols, 1).flatten(0, 1), len(cols)  # row-major: one row per image


def reconstruction_columns(r_t0, mask_ratio_t0, mask_ratio, ts=(100, 300, 500, 800)):
    """What reconstruction_rows' columns show, in words."""
    cols = ["original"]
    if r_t0 > 0:
        cols.append(f"masked {100 * mask_ratio_t0:g}% | reconstruction")
    if r_t0 < 1:
        cols.append(f"(noised{f' + masked {100 * mask_ratio:g}%' if mask_ratio else ''} | x0 "
                    f"prediction) at t = {', '.join(map(str, ts))}")
    return " | ".join(cols)


# ---------------------------------------------------------------------------- many samples
def class_labels(model, n, class_label=None):
    """The labels of n samples: None (unconditional), one class, or an equal number per class
    (n // classes each, in class order)."""
    if model.num_classes is None:
        return None
    if class_label is not None:
        return torch.full((n,), class_label)
    return torch.arange(model.num_classes).repeat_interleave(max(1, n // model.num_classes))


def generate(model, labels, n, steps=125, cfg_scale=None, eta=1.0, seed=0, batch_size=256,
             desc="sampling"):
    """n samples in [-1, 1] (float, on the CPU), batch by batch, with one progress bar over all of
    them. One generator, seeded once: the seed and the batch size fix every sample."""
    dev = next(model.parameters()).device
    S, C = model.config["img_size"], model.channels
    g = torch.Generator(dev).manual_seed(seed)
    amp = precision(dev)[0]  # bf16 where the device runs it natively, as train.py
    chunks = []
    with tqdm(total=n, desc=desc, unit="img", disable=n <= batch_size) as bar:
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            y = None if labels is None else labels[s:s + b].to(dev)
            with autocast(dev, amp):
                chunks.append(ddim_sample(model, (b, C, S, S), steps, y, cfg_scale, eta, g,
                                          progress=n <= batch_size).cpu())
            bar.update(b)
    return torch.cat(chunks)


# ---------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", help="checkpoint (default: the newest runs/*/ckpt.pt)")
    a("--n", type=int, default=64, help="number of samples (default 64; per class: n // classes)")
    a("--steps", type=int, default=125, help="DDIM steps, 1..1000 (default 125)")
    a("--eta", type=float, default=1.0, help="DDIM eta (default 1.0, as the official sampler)")
    a("--cfg-scale", type=float, help="classifier-free guidance scale (conditional checkpoints)")
    a("--class-label", type=int, help="sample only this class (conditional checkpoints)")
    a("--seed", type=int, default=0,
      help="fixes the starting noise, the sampler noise and the masks")
    a("--batch-size", type=int, default=256, help="images per sampling batch")
    a("--out", help="PNG to write (default: samples.png / reconstruction.png in the run folder)")
    a("--npz",
      help="also save the raw uint8 samples [N, H, W, C] and labels here (for tools/fid.py)")
    a("--fid", type=int, metavar="N", help="sample N images (an equal number per class for a "
      "conditional checkpoint) and score their FID against CIFAR-10 train (tools/fid.py); the "
      "number goes to fid-N-steps<S>[-cfg<s>].json beside the checkpoint")
    a("--inception", help="--fid: the Inception TorchScript file (else as tools/fid.py finds it)")
    a("--reconstruct", action="store_true", help="masked-reconstruction picture of test images")
    a("--data-dir", default="./data", help="--reconstruct and --fid: the dataset folder")
    a("--raw", action="store_true", help="use the raw weights even when the checkpoint has an EMA")
    a("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    return p.parse_args(argv)


def check(args, num_classes, ckpt_path):
    """One line for every impossible request, before any work (num_classes: the checkpoint's)."""
    if not 1 <= args.steps <= 1000:
        raise FlagError(f"--steps {args.steps}: use 1..1000 DDIM steps")
    if args.n < 1 or args.batch_size < 1 or (args.fid is not None and args.fid < 2):
        raise FlagError("--n and --batch-size must be positive, --fid at least 2")
    check_finite(args, FlagError)
    if not 0 <= args.eta <= 1:
        raise FlagError(f"--eta {args.eta}: use 0 (deterministic DDIM) .. 1 (the default)")
    if num_classes is None and (args.cfg_scale is not None or args.class_label is not None):
        raise FlagError(f"{ckpt_path} is unconditional: --cfg-scale and --class-label need a "
                        "checkpoint fine-tuned with labels (train.py --finetune)")
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise FlagError(f"--class-label {args.class_label} is out of range: the checkpoint has "
                        f"classes 0..{num_classes - 1}")
    if args.fid is not None and args.reconstruct:
        raise FlagError("--fid scores samples; drop --reconstruct")
    if args.fid is not None and num_classes and args.class_label is None and args.fid % num_classes:
        raise FlagError(f"--fid {args.fid}: use a multiple of the {num_classes} classes "
                        "(an equal number of samples per class)")


def newest_checkpoint():
    ckpts = sorted(Path("runs").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FlagError("no runs/*/ckpt.pt found; train one with train.py or pass --ckpt")
    return ckpts[-1]


def main(argv=None):
    from tools.fid import FIDError
    return command_line("sample.py", lambda: sample(get_args(argv)),
                        (CheckpointError, DataError, FlagError, FIDError))


def sample(args):
    device = pick(args.device)
    ckpt_path = Path(args.ckpt) if args.ckpt else newest_checkpoint()
    model, ckpt = load_checkpoint(ckpt_path, device, ema=not args.raw)
    num_classes = model.num_classes
    check(args, num_classes, ckpt_path)
    weights = "EMA" if ckpt.get("ema") is not None and not args.raw else "raw"
    tqdm.write(f"checkpoint {ckpt_path} ({weights} weights, step {ckpt.get('step')}, "
               f"{'conditional' if num_classes else 'unconditional'})")
    name = "reconstruction.png" if args.reconstruct else "samples.png"
    out = writable(args.out or ckpt_path.parent / name, "--out")  # checked before the work
    npz = writable(args.npz, "--npz") if args.npz else None
    start = time.time()

    if args.reconstruct:
        run = ckpt["config"].get("train", {})  # the run's own method: what it was trained on
        ds = load_dataset(run.get("dataset", "cifar10"), args.data_dir, model.config["img_size"])
        settings = [run.get(key, METHODS["umd"][key])  # older runs: umd's
                    for key in ("r_t0", "mask_ratio_t0", "mask_ratio")]
        grid, ncol = reconstruction_rows(model, to_float(ds.test_x[:min(args.n, 8)].to(device)),
                                         *settings, seed=args.seed)
        size = save_grid(grid, out, ncol)
        print(f"wrote {out} ({size[1]}x{size[0]} px): rows of {reconstruction_columns(*settings)}")
        return 0

    if args.fid is not None:  # the network, the reference and the record first: they fail now
        from tools.fid import fid_of_images, fid_record_path, fid_reference
        net, reference = fid_reference(args.inception, args.data_dir, device)
        record = fid_record_path(args, ckpt_path)
        start = time.time()
    n = args.fid or args.n
    labels = class_labels(model, n, args.class_label)
    n = n if labels is None else len(labels)
    samples = generate(model, labels, n, args.steps, args.cfg_scale, args.eta, args.seed,
                       args.batch_size)
    seconds = time.time() - start
    if args.fid is not None:  # the result is printed before any file is written
        images = torch.from_numpy(to_uint8(samples)).permute(0, 3, 1, 2)  # what --npz keeps
        value = fid_of_images(images, reference, net)
        print(f"FID-{n} against CIFAR-10 train: {value:.2f} ({time.time() - start:.0f}s in all)")
    # the picture: one row per class (at most 10 of each), or a square of at most 100
    if labels is not None and args.class_label is None:
        per = n // num_classes
        ncol = min(per, 10)
        shown = samples.view(num_classes, per, *samples.shape[1:])[:, :ncol].flatten(0, 1)
    else:
        shown = samples[:100]
        ncol = max(1, int(len(shown) ** 0.5))
    size = save_grid(shown, out, ncol)
    if npz:  # exactly this name: np.savez would add .npz to one without it
        save_atomic(lambda f: np.savez(f, samples=to_uint8(samples), labels=np.array(
            [] if labels is None else labels.numpy())), npz)
    guidance = f", cfg scale {args.cfg_scale:g}" if args.cfg_scale is not None else ""
    print(f"wrote {out} ({size[1]}x{size[0]} px): {n} samples, {args.steps} DDIM steps{guidance}, "
          f"{seconds:.1f}s" + (f"; raw samples in {npz}" if npz else ""))
    if args.fid is not None:
        write_json(dict(
            fid=value, n=n, reference="cifar10-train", n_reference=reference[2],
            steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale, seed=args.seed,
            ckpt=str(ckpt_path), ckpt_step=ckpt.get("step"), weights=weights,
            network_sha256=net.sha256, sampling_seconds=seconds), record)
        print(f"wrote {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
