"""Probe a checkpoint's representation on CIFAR-10: linear (MAE protocol), few-shot ridge
(the official in-training probe), weighted kNN; or the same probes on raw pixels.

    python probe.py runs/umd-tiny-p4/ckpt.pt             # linear probe, the number people quote
    python probe.py runs/umd-tiny-p4/ckpt.pt --mode all  # linear + few-shot + kNN, one extraction
    python probe.py --pixels --mode all                   # the floor every representation must beat

References:
  "official": the UMD code, github.com/philippe-eecs/small-vision
      (big_vision/evaluators/fewshot_lsr.py, the few-shot ridge probe;
      big_vision/trainers/train_ae.py "noised_predict", the t = 50 read-out)
  linear probe: MAE (He et al., arXiv 2111.06377), github.com/facebookresearch/mae main_linprobe.py
  weighted kNN: Wu et al. 2018 (InstDisc), arXiv 1805.01978; DINO (Caron et al.), arXiv 2104.14294
"""
import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from corruption import CLEAN, cosine_alphas_cumprod, q_sample, time_input
from data import DataError, Stream, derive_seed, load_dataset, to_float
from devices import autocast, pick, precision
from machinery import FlagError, command_line, write_json, writable
from model import CheckpointError, load_checkpoint

NOISE_BLOCK = 1000  # feature noise is drawn per fixed block of images: independent of batch size


# ---------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(model, images, t=None, batch_size=None, seed=0, desc=None):
    """Features [N, d] (float32, CPU) of uint8 images: eval mode, no masking, mean of the class
    tokens. t=None reads the clean image (time input CLEAN); t=N reads x_t at diffusion step N.
    Default batches: 500 images on a GPU, 4096 patch tokens on a CPU (they fit its caches)."""
    was_training, dev = model.training, next(model.parameters()).device
    batch_size = batch_size or (500 if dev.type == "cuda" else max(1, 4096 // model.num_patches))
    model.eval()
    abar = cosine_alphas_cumprod().to(dev)
    amp = precision(dev)[0]  # bf16 where the device runs it natively, as train.py
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
        x = to_float(images[s:s + batch_size].to(dev))
        time_in = torch.full((len(x),), CLEAN, device=dev)
        if t is not None:
            ts = torch.full_like(time_in, t)
            x, time_in = (q_sample(x, ts, _block_noise(s, s + len(x), x.shape[1:], seed).to(dev),
                                   abar), time_input(ts))
        with autocast(dev, amp):
            out.append(model.features(x, time_in).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _block_noise(start, end, shape, seed):
    first, last = start // NOISE_BLOCK, (end - 1) // NOISE_BLOCK
    noise = torch.cat([
        torch.randn(NOISE_BLOCK, *shape, generator=torch.Generator().manual_seed(
            derive_seed(seed, Stream.PROBE_NOISE, b)))
        for b in range(first, last + 1)])
    return noise[start - first * NOISE_BLOCK:end - first * NOISE_BLOCK]


def pixel_features(images):
    return images.flatten(1).float() / 127.5 - 1


# ---------------------------------------------------------------------------- few-shot ridge
def fewshot_indices(labels, shots, seed=0):
    """`shots` training images per class, chosen by `seed`."""
    g, idx = torch.Generator().manual_seed(derive_seed(seed, Stream.FEWSHOT)), []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise DataError(f"--shots {shots} is larger than class {c}, "
                            f"which has {len(members)} training images")
        idx.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(idx)


def ridge_accuracy(train_f, train_y, test_f, test_y, num_classes, l2=1024.0):
    """Closed-form ridge regression as in the official probe (big_vision fewshot_lsr):
    standardised features, a constant bias feature of 100 (almost unregularised), one-hot
    targets in {-1, +1}, l2 = 1024; accuracy of the arg-max. Solved in float64."""
    x, xt = train_f.double(), test_f.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    bias = lambda z: F.pad((z - mean) / std, (0, 1), value=100.0)
    x, xt = bias(x), bias(xt)
    y = 2.0 * F.one_hot(train_y, num_classes).double() - 1.0
    if len(x) >= x.shape[1]:  # (X^T X + l2 I)^-1 X^T Y, or the dual form when there are fewer rows
        w = torch.linalg.solve(x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    else:
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(len(x), dtype=x.dtype), y)
    return ((xt @ w).argmax(1) == test_y).double().mean().item()


def fewshot_probe(train_f, train_y, test_f, test_y, num_classes, shots, seeds):
    accs = []
    for s in range(seeds):
        i = fewshot_indices(train_y, shots, s)
        accs.append(ridge_accuracy(train_f[i], train_y[i], test_f, test_y, num_classes))
    return float(np.mean(accs)), float(np.std(accs)), accs


class QuickProbe:
    """The in-training probe of train.py: ridge on fixed subsets (100 training images per class,
    the first 2000 test images), seconds not minutes. Also gives the raw-pixel number."""

    def __init__(self, ds, shots=100, n_test=2000):
        try:
            self.idx = fewshot_indices(ds.train_y, shots, 0)
        except DataError:  # said in train.py's terms: it has no --shots
            raise DataError(f"the in-training probe takes {shots} training images of every class, "
                            "more than the data have; pass --probe-every 0") from None
        self.train_x, self.train_y = ds.train_x[self.idx], ds.train_y[self.idx]
        self.test_x, self.test_y = ds.test_x[:n_test], ds.test_y[:n_test]
        self.num_classes = ds.num_classes

    def __call__(self, model=None, t=None):
        feat = pixel_features if model is None else lambda x: extract_features(model, x, t)
        return ridge_accuracy(feat(self.train_x), self.train_y, feat(self.test_x), self.test_y,
                              self.num_classes)

    def report(self, model, ema, t, step):
        """The log record of one probe of the raw and EMA weights (and of raw pixels at step 0)."""
        start, rec = time.time(), {}
        if step == 0:
            rec["probe_pixels"] = self()
        rec["probe"], rec["probe_ema"] = self(model, t), self(ema, t)
        pixels = f", pixels {100 * rec['probe_pixels']:.2f}%" if "probe_pixels" in rec else ""
        tqdm.write(f"step {step}: {self.train_y.numel()}-image ridge probe "
                   f"{100 * rec['probe']:.2f}% (EMA {100 * rec['probe_ema']:.2f}%{pixels}"
                   f"{f', t={t}' if t is not None else ''}) in {time.time() - start:.1f}s")
        return rec


# ---------------------------------------------------------------------------- linear (MAE protocol)
class LinearHeads(nn.Module):
    """BatchNorm without affine, then a linear layer (MAE's linear probe), G times over: one head
    per (lr, weight decay) setting, on the same normalised features. forward -> [G, N, classes]."""

    def __init__(self, dim, num_classes, heads, generator):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        # Every head starts from the same weights, as separate runs with one seed would.
        w = torch.empty(num_classes, dim).normal_(std=0.01, generator=generator).T
        self.weight = nn.Parameter(w.expand(heads, -1, -1).clone())  # [G, dim, classes]
        self.bias = nn.Parameter(torch.zeros(heads, 1, num_classes))

    def forward(self, f):
        x = self.norm(f)
        return torch.baddbmm(self.bias, x.expand(len(self.weight), -1, -1), self.weight)


def train_linear(train_f, train_y, num_classes, settings, epochs=20, batch_size=256, seed=0):
    """Train one head per (lr, weight_decay) in settings, all at once: SGD with momentum 0.9,
    cosine learning rate, batch 256 (MAE's protocol). Same batches, same order, shared BatchNorm
    statistics: the separate runs of a grid search, computed together."""
    g = torch.Generator().manual_seed(derive_seed(seed, Stream.LINEAR_PROBE))
    heads = LinearHeads(train_f.shape[1], num_classes, len(settings), g)
    lr, wd = (torch.tensor([s[i] for s in settings]).view(-1, 1, 1) for i in (0, 1))
    momentum = [torch.zeros_like(p) for p in (heads.weight, heads.bias)]
    batch_size = min(batch_size, len(train_f))
    steps, step = epochs * (len(train_f) // batch_size), 0
    for _ in tqdm(range(epochs),
                  desc=f"linear probe ({len(settings)} head{'s' * (len(settings) > 1)})",
                  leave=False):
        perm = torch.randperm(len(train_f), generator=g)
        for i in range(len(train_f) // batch_size):  # the last partial batch is dropped (BatchNorm)
            b = perm[i * batch_size:(i + 1) * batch_size]
            logits = heads(train_f[b])
            # The sum over heads of each head's mean loss: every head gets its own gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[b].repeat(len(settings)),
                                   reduction="sum") / len(b)
            grads = torch.autograd.grad(loss, (heads.weight, heads.bias))
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():  # torch.optim.SGD's update, with lr and weight decay per head
                for p, grad, buf in zip((heads.weight, heads.bias), grads, momentum):
                    buf.mul_(0.9).add_(grad + wd * p)
                    p.sub_(lr * scale * buf)
            step += 1
    return heads.eval()


@torch.no_grad()
def accuracy(heads, f, y):
    """Top-1 of each head: a list, one per head."""
    return (heads(f).argmax(-1) == y).float().mean(1).tolist()


LINEAR_GRID = [(lr, wd) for lr in (0.1, 0.01, 0.001) for wd in (0.0, 1e-4, 1e-3)]


def linear_probe(train_f, train_y, test_f, test_y, num_classes, grid=LINEAR_GRID, epochs=20,
                 val_fraction=0.1, log=print):
    """Choose learning rate and weight decay on the last val_fraction of the training features
    (on all of CIFAR-10 train, its last 5000 images; test images are never seen), then train on
    all training features with the best pair and report top-1 on the test set."""
    n_val = int(len(train_f) * val_fraction)
    tr_f, tr_y, va_f, va_y = train_f[:-n_val], train_y[:-n_val], train_f[-n_val:], train_y[-n_val:]
    val = dict(zip(grid, accuracy(train_linear(tr_f, tr_y, num_classes, grid, epochs), va_f, va_y)))
    for (lr, wd), acc in val.items():
        log(f"  lr {lr:g}, weight decay {wd:g}: validation top-1 {100 * acc:.2f}%")
    lr, wd = max(val, key=val.get)
    test_acc, = accuracy(train_linear(train_f, train_y, num_classes, [(lr, wd)], epochs),
                         test_f, test_y)
    return test_acc, dict(lr=lr, weight_decay=wd, epochs=epochs, val_images=n_val,
                          validation={f"lr={k[0]:g},wd={k[1]:g}": v for k, v in val.items()})


# ---------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k=20, temperature=0.07, chunk=1000):
    """Weighted k-NN on cosine similarity (InstDisc / DINO): each of the k nearest training
    images votes for its class with weight exp(similarity / temperature)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    correct = 0
    for s in range(0, len(test_f), chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, train_y[idx],
                                                                (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[s:s + chunk]).sum().item()
    return correct / len(test_f)


# ---------------------------------------------------------------------------- all of them
def evaluate(train_f, train_y, test_f, test_y, num_classes, modes=("linear", "fewshot", "knn"),
             split="test", shots=100, seeds=5, k=20):
    """The probes named in modes on one set of features: (results dict, one summary line each)."""
    results, lines = {}, []
    if "linear" in modes:
        acc, chosen = linear_probe(train_f, train_y, test_f, test_y, num_classes,
                                   log=lambda s: tqdm.write(s, file=sys.stderr))
        results["linear"] = dict(top1=acc, **chosen)
        lines.append(f"linear probe top-1: {100 * acc:.2f}% ({split}; lr {chosen['lr']:g}, "
                     f"weight decay {chosen['weight_decay']:g} chosen on the last "
                     f"{chosen['val_images']} training images)")
    if "fewshot" in modes:
        mean, sd, accs = fewshot_probe(train_f, train_y, test_f, test_y, num_classes, shots, seeds)
        results["fewshot"] = dict(shots=shots, mean=mean, std=sd, per_seed=accs, l2=1024.0)
        lines.append(f"{shots}-shot ridge probe top-1: {100 * mean:.2f}% +- {100 * sd:.2f} "
                     f"({split}; {seeds} seeds)")
    if "knn" in modes:
        acc = knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k=k)
        results["knn"] = dict(top1=acc, k=k, temperature=0.07)
        lines.append(f"{k}-NN probe top-1: {100 * acc:.2f}% ({split}; cosine, temperature 0.07)")
    return results, lines


# ---------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint to probe (runs/<name>/ckpt.pt)")
    p.add_argument("--pixels", action="store_true",
                   help="probe standardised raw pixels instead of a checkpoint")
    p.add_argument("--mode", choices=["linear", "fewshot", "knn", "all"], default="linear",
                   help="which probe (default linear)")
    p.add_argument("--dataset", choices=["cifar10", "folder"], default="cifar10",
                   help="cifar10, or folder: --data-dir/<class>/<image> "
                        "(every tenth image per class is the test split)")
    p.add_argument("--img-size", type=int, default=32,
                   help="image size for --dataset folder (default 32)")
    p.add_argument("--data-dir", default="./data",
                   help="folder holding cifar-10-batches-py (downloaded if missing)")
    p.add_argument("--shots", type=int, default=100,
                   help="few-shot: training images per class (default 100)")
    p.add_argument("--seeds", type=int, default=5,
                   help="few-shot: number of random draws of the shots (default 5)")
    p.add_argument("--k", type=int, default=20, help="kNN: neighbours (default 20)")
    p.add_argument("--t", type=int, default=None,
                   help="read features of x_t at this diffusion step (time input t + 1); "
                        "the official read-out for dit/maskdit is --t 50")
    p.add_argument("--raw", action="store_true",
                   help="probe the raw weights even when the checkpoint has an EMA")
    p.add_argument("--batch-size", type=int,
                   help="feature-extraction batch size "
                        "(default 500 on a GPU, 4096 patch tokens on a CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="default auto: cuda when available")
    p.add_argument("--json", help="also write every number and setting to this JSON file")
    args = p.parse_args(argv)
    return command_line("probe.py", lambda: run(args), (DataError, CheckpointError, FlagError))


def run(args):
    if args.pixels == bool(args.ckpt):
        raise FlagError("give a checkpoint or --pixels (not both)")
    if args.pixels and (args.t is not None or args.raw):
        raise FlagError("--t and --raw apply to checkpoints, not to --pixels")
    if args.t is not None and not 0 <= args.t < 1000:
        raise FlagError(f"--t {args.t} is outside the diffusion steps 0..999")
    if args.shots < 1 or args.seeds < 1 or args.k < 1 or (args.batch_size or 1) < 1:
        raise FlagError("--shots, --seeds, --k and --batch-size must be positive")
    json_path = writable(args.json, "--json") if args.json else None  # checked before the work
    device = pick(args.device)
    ds = load_dataset(args.dataset, args.data_dir, args.img_size)
    modes = ("linear", "fewshot", "knn") if args.mode == "all" else (args.mode,)
    n = len(ds.train_y)  # what the probes need fails now, not after the features
    if "fewshot" in modes:
        fewshot_indices(ds.train_y, args.shots)
    if "knn" in modes and args.k > n:
        raise FlagError(f"--k {args.k} is larger than the {n} training images; pass a smaller --k")
    if "linear" in modes and n < 20:
        raise FlagError(f"the linear probe validates on the last 10% of the training images and "
                        f"needs at least 20; the data have {n}: use --mode fewshot or knn, "
                        "or more data")
    start = time.time()
    if args.pixels:
        what = "raw pixels (standardised)"
        train_f, test_f = pixel_features(ds.train_x), pixel_features(ds.test_x)
        mean, std = train_f.mean(0), train_f.std(0) + 1e-5
        train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    else:
        model, ckpt = load_checkpoint(args.ckpt, device, ema=not args.raw)
        if model.config["img_size"] != ds.train_x.shape[-1]:
            raise FlagError(f"{args.ckpt} was trained on {model.config['img_size']}px images, "
                            f"the data are {ds.train_x.shape[-1]}px")
        weights = "EMA" if ckpt.get("ema") is not None and not args.raw else "raw"
        what = (f"{weights} weights of {args.ckpt} "
                f"({ckpt['config'].get('train', {}).get('method', '?')}, step {ckpt.get('step')}"
                f", t={'clean' if args.t is None else args.t})")
        train_f = extract_features(model, ds.train_x, args.t, args.batch_size,
                                   desc="features (train)")
        test_f = extract_features(model, ds.test_x, args.t, args.batch_size, desc="features (test)")
    split = f"{args.dataset.replace('cifar10', 'CIFAR-10')} test, {len(test_f)} images"
    results, lines = evaluate(train_f, ds.train_y, test_f, ds.test_y, ds.num_classes, modes, split,
                              args.shots, args.seeds, args.k)
    results = dict(settings=vars(args), what=what,
                   feature_dim=train_f.shape[1], **results)
    results["seconds"] = time.time() - start
    print(f"# {what}")
    print("\n".join(lines))
    if json_path:
        write_json(results, json_path)


if __name__ == "__main__":
    sys.exit(main())
