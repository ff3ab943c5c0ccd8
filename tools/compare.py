"""The paper's comparison on CIFAR-10 in one command: UMD, MAE, DiT and MaskDiT trained with the
same network, schedule, batch, seed and data order (only the method preset differs), then
probed, fine-tuned with labels, sampled and scored.

    python tools/compare.py --preset cpu     # tiny/4 on 2 CPU cores, 2.4 hours (README)
    python tools/compare.py --preset cpu --seeds 0,1,2   # the same 3 times: mean +- s.d.
    python tools/compare.py --preset gpu     # small/2 on one H100/H200: about 27 min estimated,
                                             # not yet run
    python tools/compare.py --model tiny --patch-size 8 --epochs 0.05 --finetune-epochs 0.02 --fid 0

For each method, one stage after another, each writing its result into OUT/<method>/:
  pretrain   train.py (probes read its EMA weights; the fine-tune starts from its raw ones)
  probe      probe.py: linear, 100-shot ridge and 20-NN on clean images; dit and maskdit also on
             x_t at t = 50, their official read-out (probe-t50)
  finetune   train.py --finetune: class-conditional, classifier-free guidance
  samples    sample.py: --fid images (equal per class) with --cfg-scale, into samples.npz
  fid        tools/fid.py against CIFAR-10 train, where the Inception network is found; else the
             samples wait, and the next run of the same command (here or on another machine)
             scores them
Every training starts from an empty torch.compile cache, so that eight of them in one process
never reach dynamo's recompile limit (and run uncompiled past it).
Running the same command again skips finished stages and resumes an interrupted training, so a
comparison can be stopped (Ctrl-C) and continued, or spread over machines (e.g. trained on a GPU,
then `--out FOLDER --device cpu` scores the FID of its samples where the Inception network is).
The summary: OUT/results.json (every number, the settings, the machines), OUT/table.md,
OUT/compare.png (samples; right, the few-shot probe against FID) and OUT/curves.png (learning
curves of the pre-trainings, tools/curves.py).

Several seeds, `--seeds 0,1,2`: each seed is a whole comparison, in time too (its own pre-training
seed: init, data order, masks, noise; its own probe subset and samples), one after another. The
first seed is the folder's own (settings.json) and lies where a single-seed comparison puts it,
OUT/<method>/; seed K lies in OUT/seed-K/<method>/. So rerunning a finished single-seed comparison
with --seeds 0,1,2 keeps seed 0 and adds the others; the summary takes every seed in the folder.
With several seeds table.md gives every number as mean +- sample s.d. over the seeds, then each
method's paired difference from umd (seed by seed, then mean +- s.d.), then each seed's own table;
results.json holds the same; compare.png shows the first seed's samples.

The in-training probe of curves.png: the pre-trainings run train.py's probe every --probe-every
epochs (cpu preset 0.2: steps 0, 78, 156, 234, 312 and 390; gpu 1.0: 9 points). A probe is two
feature passes (raw and EMA weights) over 1000 training and 2000 test images: 13-18 s each at
tiny/4 on 2 cores with native bf16 (measured in the 3-seed run, RESULTS.md), so the cpu preset's 24
probes add about 6 minutes. --probe-every may change between runs of a comparison (it changes no
number of the table); a resumed training keeps its own.

References: the official comparison (ImageNet 64x64, B/4): github.com/philippe-eecs/small-vision,
README; UMD: arXiv 2406.17688.
"""
import argparse
import functools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import train  # noqa: E402
from data import CIFAR_CLASSES, DataError, load_dataset  # noqa: E402
from machinery import (FlagError, check_finite, os_error_line,  # noqa: E402
                       read_log, save_atomic, write_json)
from model import CheckpointError, load_checkpoint  # noqa: E402
from probe import evaluate, extract_features, fewshot_indices  # noqa: E402
from sample import class_labels, generate, to_uint8  # noqa: E402
from tools.bench import forward_flops, step_flops  # noqa: E402
from tools.curves import PICTURE_PER_CLASS, figure, picture  # noqa: E402
from tools.fid import FIDError, Inception, fid_of_images, stats_of  # noqa: E402
from tools.tables import aggregate, epochs_text, seeds_table, table, tradeoff  # noqa: E402

# The presets (README "The comparison"): cpu takes 2.4 hours of 2 cores (measured, without the
# in-training probes: see above); gpu, on one H100/H200, is estimated by gpu_estimate() below (not
# yet run on one).
# The fine-tunes are short, so their EMA is too: the official 1 - 1e-4 * batch / 256 would leave
# it at the starting weights, fresh label embedding included. With these decays under 3% of the
# start is left at the end (0.97 ** 117 steps on the cpu, 0.99 ** 390 on the gpu).
PRESETS = dict(
    cpu=dict(model="tiny", patch_size=4, batch_size=128, lr=1e-3, epochs=1.0, finetune_epochs=0.3,
             finetune_batch_size=128, finetune_lr=5e-4, finetune_ema_decay=0.97, fid=1000,
             fid_steps=25, cfg_scale=2.0, probe_every=0.2, device="cpu"),
    gpu=dict(model="small", patch_size=2, batch_size=1024, lr=1.5e-4, epochs=8.0,
             finetune_epochs=2.0, finetune_batch_size=256, finetune_lr=1.5e-4,
             finetune_ema_decay=0.99, fid=10000, fid_steps=50, cfg_scale=2.0, probe_every=1.0,
             device="cuda"),
)
# may differ between runs of one comparison
RUNTIME = ("methods", "data_dir", "device", "out", "compile", "seeds", "probe_every", "stages")
STAGES = ("pretrain", "probe", "finetune", "samples", "fid")  # probe includes probe-t50
# What gpu_estimate() assumes, each an assumption until a GPU run measures it: one H100/H200 at 989
# dense bf16 TFLOP/s; compiled training at 30% of it, eager bf16 sampling at 20%; a minute to
# compile each graph from an empty cache (umd and mae fine-tunes have 2, one per group); Inception
# at 1,000 images/s (fp32, TF32 off); 30 s per probe read-out; 15 s of start-up and checkpoints per
# training.
GPU_ASSUMED = dict(peak_flops=989e12, train_mfu=0.30, sample_mfu=0.20, compile_s_per_graph=60,
                   inception_img_s=1000, probe_s=30, training_overhead_s=15)


def gpu_estimate(p, methods=tuple(config.METHODS), train_images=50000, a=GPU_ASSUMED):
    """Minutes of each part of a comparison with settings p (a preset's dict, or vars(args)) on one
    H100/H200: FLOPs at an assumed MFU, cold compiles, guided sampling and FID. An estimate."""
    minutes = dict.fromkeys(("pre-training", "fine-tuning", "compilation", "probes", "sampling",
                             "FID", "start-up"), 0.0)
    train_speed, sample_speed = a["peak_flops"] * a["train_mfu"], a["peak_flops"] * a["sample_mfu"]
    # guidance: 2 images a call
    call = 2 * forward_flops(p["model"], p["patch_size"], conditional=True)
    for m in methods:
        pre, ft = config.METHODS[m], {**config.METHODS[m], **config.FINETUNE_METHODS[m]}
        minutes["pre-training"] += (p["epochs"] * train_images
                                    * step_flops(p["model"], p["patch_size"], **pre)[0]
                                    / train_speed)
        minutes["fine-tuning"] += (p["finetune_epochs"] * train_images
                                   * step_flops(p["model"], p["patch_size"], **ft)[0] / train_speed)
        # one graph per group of the batch
        graphs = sum((s["r_t0"] > 0) + (s["r_t0"] < 1) for s in (pre, ft))
        minutes["compilation"] += graphs * a["compile_s_per_graph"]
        # dit, maskdit: also at t = 50
        minutes["probes"] += a["probe_s"] * (2 if pre["r_t0"] == 0 else 1)
        n = p["fid"] or PICTURE_PER_CLASS * len(CIFAR_CLASSES)
        # DDIM steps + the final call
        minutes["sampling"] += n * (p["fid_steps"] + 1) * call / sample_speed
        minutes["FID"] += p["fid"] / a["inception_img_s"]
        minutes["start-up"] += 2 * a["training_overhead_s"]
    if p["fid"]:  # CIFAR-10 train's statistics, once, then cached
        minutes["FID"] += train_images / a["inception_img_s"]
    return {k: v / 60 for k, v in minutes.items()}


def estimate_line(p):
    parts = gpu_estimate(p)
    return (f"about {sum(parts.values()):.0f} minutes of one H100/H200 (" + ", ".join(
        f"{k} {v:.1f}" for k, v in parts.items()) + "; an estimate until a GPU run measures it)")


class CompareError(Exception):
    """Bad input: one line, exit status 2; nothing finished is ever deleted."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="default auto: the --out folder's own, else gpu with CUDA, else cpu. "
                   "cpu takes 2.4 hours of 2 cores (measured without its in-training probes, "
                   "which add about 6 minutes); "
                   f"gpu {estimate_line(PRESETS['gpu'])}. "
                   + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in d.items())
                               for k, d in PRESETS.items()))
    p.add_argument("--methods", default="umd,mae,dit,maskdit",
                   help="comma-separated (default umd,mae,dit,maskdit)")
    for key, value in PRESETS["cpu"].items():
        if key != "device":
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                           choices=list(config.SIZES) if key == "model" else None,
                           help=("epochs between the pre-trainings' in-training probes, drawn "
                                 "in curves.png (0 = off); " if key == "probe_every" else "")
                           + "from --preset unless given")
    p.add_argument("--seed", type=int,
                   help="one seed for every method: same init and data order (default 0)")
    p.add_argument("--seeds",
                   help="comma-separated seeds, each a whole comparison, e.g. 0,1,2: the table "
                   "gives mean +- s.d. over them; the first is the folder's own, the others go "
                   "to OUT/seed-K (default: --seed)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run now, e.g. pretrain,probe for the "
                   "representations of every method and seed first; the same command without "
                   "it does the rest later (default: all)")
    p.add_argument("--shots", type=int, default=100,
                   help="few-shot ridge probe: training images per class (default 100)")
    p.add_argument("--probe-images", type=int,
                   help="training images the probes learn from, equal per class (default: all "
                   "50000; 5000 when pre-training is under one epoch, a smoke run, where "
                   "extracting features would take most of the time; drawn with --seed)")
    p.add_argument("--data-dir", default="./data",
                   help="where cifar-10-batches-py lives (default ./data)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="default: the preset's")
    p.add_argument("--out", help="run folder (default runs/compare-<model>-p<patch>)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the trainings (default: train.py's, on with CUDA); "
                   "--no-compile where train.py says that compile cannot work on the machine")
    args = p.parse_args(argv)
    try:
        args.seeds = ([int(k) for k in args.seeds.split(",") if k.strip()] if args.seeds
                      else [0 if args.seed is None else args.seed])
    except ValueError:
        raise CompareError(f"--seeds {args.seeds}: give whole numbers separated by commas, "
                           "e.g. 0,1,2") from None
    if args.seed is None and args.seeds:  # the first seed is the folder's own
        args.seed = args.seeds[0]
    saved = saved_settings(args.out) if args.out else None
    if args.preset == "auto" and saved:  # go on with that comparison, on any machine
        args.preset = saved.get("preset", "auto")
    preset = ("gpu" if args.preset == "gpu" or (args.preset == "auto" and torch.cuda.is_available())
              else "cpu")
    for key, value in PRESETS[preset].items():
        if key != "device" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.probe_images is None:
        args.probe_images = 50000 if args.epochs >= 1 else min(50000, max(5000, 20 * args.shots))
    args.preset = preset
    args.device = PRESETS[preset]["device"] if args.device == "auto" else args.device
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    args.out = args.out or f"runs/compare-{args.model}-p{args.patch_size}"
    return args


def saved_settings(out):
    """The settings.json of run folder `out`; None where there is none yet."""
    path = Path(out) / "settings.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:  # not JSON, or not text
        saved = None
    if not isinstance(saved, dict):
        raise CompareError(f"{path} is damaged; restore it, or pass another --out")
    return saved


def check(args):
    check_finite(args, CompareError)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CompareError(f"--out {args.out} is a file; "
                           "pass a folder (new, or of this comparison)")
    if not args.seeds or len(set(args.seeds)) < len(args.seeds) or args.seed != args.seeds[0]:
        raise CompareError(f"--seeds {','.join(map(str, args.seeds)) or '(none)'}: give distinct "
                           "seeds, the first the --seed where both are given")
    unknown = [m for m in args.methods if m not in config.METHODS]
    if unknown or not args.methods:
        raise CompareError(f"unknown method {', '.join(unknown) or '(none)'}; "
                           f"choose from {', '.join(config.METHODS)}")
    if not args.stages or not set(args.stages) <= set(STAGES):
        raise CompareError(f"--stages {','.join(args.stages) or '(none)'}: choose from "
                           f"{','.join(STAGES)}")
    # Checked before the folder is claimed: a typo must not lock a folder to its settings.
    if (args.fid < 0 or args.fid % len(CIFAR_CLASSES) or not 1 <= args.fid_steps <= 1000
            or args.epochs <= 0 or args.finetune_epochs <= 0):
        raise CompareError("--fid must be 0 or a multiple of the 10 classes, "
                           "--fid-steps in 1..1000, the epochs positive")
    if (min(args.batch_size, args.finetune_batch_size, args.lr, args.finetune_lr) <= 0
            or not 0 <= args.finetune_ema_decay < 1 or args.probe_every < 0):
        raise CompareError("the batch sizes and learning rates must be positive, "
                           "--finetune-ema-decay in [0, 1), --probe-every >= 0")
    if args.patch_size < 1 or 32 % args.patch_size:
        raise CompareError(f"--patch-size {args.patch_size} must divide CIFAR-10's 32 pixels "
                           "(e.g. 2, 4, 8)")
    if not 1 <= args.shots <= 5000:
        raise CompareError("--shots must be in 1..5000 "
                           "(CIFAR-10 has 5000 training images per class)")
    if (args.probe_images % len(CIFAR_CLASSES)
            or not args.shots <= args.probe_images // len(CIFAR_CLASSES) <= 5000):
        raise CompareError("--probe-images must be a multiple of the 10 classes, "
                           f"from 10 x --shots ({10 * args.shots}) to 50000")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CompareError("this preset (or --device cuda) needs CUDA to train; --device cpu "
                           "finishes a comparison trained elsewhere (FID of its samples), "
                           "--preset cpu starts one for the CPU")
    old = saved_settings(args.out)
    if old is not None:
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {v}"
                   for k, v in settings(args).items() if old.get(k) != v]
        if changed:
            raise CompareError(f"{args.out} holds a comparison with other settings "
                               f"({'; '.join(changed)}); rerun it with its own settings or pass "
                               "another --out")


def settings(args):
    """What a comparison's results depend on: the same in every run of it."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME}


# ----------------------------------------------------------------------------- stages
def run_training(run_dir, argv, args):
    """train.py in this process: fresh, or --resume where a checkpoint was left. Returns a summary
    read from its log: steps, training seconds (probes and checkpoints excluded), img/s."""
    if (run_dir / "ckpt.pt").exists():  # an interrupted run: its settings are in its checkpoint
        argv = ["--resume"]
    if args.compile is not None:
        argv = [*argv, "--compile" if args.compile else "--no-compile"]
    # an empty compile cache: earlier trainings' graphs would reach dynamo's recompile limit
    torch._dynamo.reset()
    code = train.train(config.get_args([*map(str, argv), "--out", str(run_dir),
                                        "--device", args.device, "--data-dir", args.data_dir]))
    if code != 0:
        raise KeyboardInterrupt  # stopped by Ctrl-C after saving: the next run resumes it
    log = read_log(run_dir / "log.jsonl")
    batch = json.loads((run_dir / "config.json").read_text())["batch_size"]
    records, seconds, prev = [r for r in log if "img_per_s" in r], 0.0, 0
    for r in records:
        seconds, prev = seconds + (r["step"] - prev) * batch / r["img_per_s"], r["step"]
    # the first interval holds the warm-up
    speeds = sorted(r["img_per_s"] for r in records[1:] or records)
    return dict(steps=prev, seconds=seconds, img_per_s=speeds[len(speeds) // 2],
                final_loss=records[-1]["loss"])


def stage_pretrain(m, d, args, ds):
    return run_training(d / "pretrain", [
        "--method", m, "--recipe", args.preset, "--model", args.model,
        "--patch-size", args.patch_size, "--batch-size", args.batch_size,
        "--lr", args.lr, "--epochs", args.epochs, "--seed", args.seed,
        "--probe-every", args.probe_every], args)


def stage_probe(m, d, args, ds, t=None):
    model, _ = load_checkpoint(d / "pretrain" / "ckpt.pt", args.device)  # EMA weights
    start = time.time()
    train_x, train_y = ds.train_x, ds.train_y
    if args.probe_images < len(train_y):  # the same subset for every method
        keep = fewshot_indices(
            train_y, args.probe_images // ds.num_classes, args.seed).sort().values
        train_x, train_y = train_x[keep], train_y[keep]
    train_f = extract_features(model, train_x, t, desc="features (train)")
    test_f = extract_features(model, ds.test_x, t, desc="features (test)")
    results, lines = evaluate(train_f, train_y, test_f, ds.test_y, ds.num_classes,
                              split="CIFAR-10 test", shots=args.shots)
    print("\n".join(f"  {line}" for line in lines))
    return dict(results, t=t, train_images=len(train_y), seconds=time.time() - start)


def stage_finetune(m, d, args, ds):
    return run_training(d / "finetune", [
        "--finetune", d / "pretrain" / "ckpt.pt", "--recipe", args.preset,
        "--epochs", args.finetune_epochs, "--batch-size", args.finetune_batch_size,
        "--lr", args.finetune_lr, "--ema-decay", args.finetune_ema_decay,
        "--seed", args.seed, "--probe-every", 0], args)


def stage_samples(m, d, args, ds):
    model, _ = load_checkpoint(d / "finetune" / "ckpt.pt", args.device)
    # equal per class
    labels = class_labels(model, args.fid or PICTURE_PER_CLASS * model.num_classes)
    start = time.time()
    samples = generate(model, labels, len(labels), args.fid_steps, args.cfg_scale, seed=args.seed,
                       desc=f"{m} samples")
    with open(d / "samples.npz.tmp", "wb") as f:
        np.savez(f, samples=to_uint8(samples), labels=labels.numpy())
    os.replace(d / "samples.npz.tmp", d / "samples.npz")
    return dict(n=len(labels), steps=args.fid_steps, cfg_scale=args.cfg_scale,
                seconds=time.time() - start)


def stage_fid(m, d, args, ds):
    """FID of the first --fid samples; None (and the stage stays open) where no network is found."""
    try:
        net = Inception(device=args.device)
    except FIDError as e:
        print(f"  FID waits: {e}. Then rerun this command "
              "(here, or where the network is, with --device cpu)")
        return None
    reference = stats_of("cifar10-train", args.data_dir, net)  # cached after its first time
    start = time.time()  # the stage's time: its samples' features, not the one-time reference
    with np.load(d / "samples.npz") as data:
        images = torch.from_numpy(data["samples"]).permute(0, 3, 1, 2)
    value = fid_of_images(images, reference, net)
    print(f"  FID-{len(images)}: {value:.2f}")
    return dict(fid=value, n=len(images), steps=args.fid_steps, cfg_scale=args.cfg_scale,
                reference="cifar10-train", network_sha256=net.sha256, seconds=time.time() - start)


def stages(args):
    """(method, name, result file, function) of the --stages asked for, in the order they run
    (probe-t50 goes with probe)."""
    out = []
    for m in args.methods:
        out.append((m, "pretrain", "pretrain.json", stage_pretrain))
        out.append((m, "probe", "probe.json", stage_probe))
        if config.METHODS[m]["r_t0"] == 0:  # never trained on clean images: the official read-out
            out.append((m, "probe-t50", "probe-t50.json",
                        functools.partial(stage_probe, t=config.NOISY_READOUT_T)))
        out.append((m, "finetune", "finetune.json", stage_finetune))
        out.append((m, "samples", "samples.json", stage_samples))
        if args.fid > 0:
            out.append((m, "fid", "fid.json", stage_fid))
    return [s for s in out if s[1].split("-")[0] in args.stages]


def seed_dir(args, k):
    """Seed k's comparison: the folder's own seed in --out itself, as with one seed."""
    return Path(args.out) if k == args.seed else Path(args.out) / f"seed-{k}"


def for_seed(args, k):
    """The arguments of seed k's comparison: its seed and its folder."""
    return argparse.Namespace(**{**vars(args), "seed": k, "out": str(seed_dir(args, k))})


def seeds_of(args):
    """--seeds, then the other seeds found in the folder (the summary drops none)."""
    found = sorted(int(m[1]) for p in Path(args.out).glob("seed-*")
                   if p.is_dir() and (m := re.fullmatch(r"seed-(-?\d+)", p.name)))
    return args.seeds + [k for k in found if k not in args.seeds]


# ----------------------------------------------------------------------------- summary
def machine():
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(cpu=cpu, cores=os.cpu_count(), gpu=gpu, torch=torch.__version__,
                python=platform.python_version())


def collect(out, methods, args):
    """Each method's results in one seed's folder: its stages' result files, and its FLOPs."""
    results = {}
    for m in methods:
        d = out / m
        r = {name: json.loads((d / f"{name}.json").read_text())
             for name in ("pretrain", "probe", "probe-t50", "finetune", "samples", "fid")
             if (d / f"{name}.json").exists()}
        cfg = d / "pretrain" / "config.json"
        if "pretrain" in r and cfg.exists():  # how it trained, for the table's footnote
            c = json.loads(cfg.read_text())
            amp = f"{c['amp']} autocast" if c.get("amp") in ("bf16", "fp16") else "float32"
            r["pretrain"]["precision"] = amp + (", compiled" if c.get("compile") else ", eager")
        flops, tokens = step_flops(args.model, args.patch_size, **config.METHODS[m])
        r["gflop_per_image"], r["encoder_tokens_per_image"] = flops / 1e9, tokens
        results[m] = r
    return results


def summarize(args):
    """results.json, table.md, compare.png and curves.png from whatever stages have finished, of
    every method and seed in the folder (a run with fewer --methods or --seeds drops none)."""
    out, seeds = Path(args.out), seeds_of(args)
    dirs = [seed_dir(args, k) for k in seeds]
    methods = [m for m in config.METHODS
               if m in args.methods or any((d / m).is_dir() for d in dirs)]
    per_seed = [collect(d, methods, args) for d in dirs]
    results = dict(settings=saved_settings(out), machine=machine(), methods=per_seed[0])
    text = table(results, args)
    if len(seeds) > 1:
        results = dict(results, seeds=seeds, methods=aggregate(per_seed),
                       per_seed={str(k): r for k, r in zip(seeds, per_seed)})
        text = seeds_table(results, per_seed, args, dirs)
    print("\n" + text, flush=True)  # on the screen first: a full disk loses no number
    write_json(results, out / "results.json")
    save_atomic(text, out / "table.md")
    pictures = {"compare.png": picture(out, methods, tradeoff(per_seed)),
                "curves.png": learning_curves(args, seeds, methods, per_seed)}
    drawn = [name for name, img in pictures.items() if img is not None]
    for name in drawn:
        save_atomic(lambda f: pictures[name].save(f, format="PNG"), out / name)
    print(f"{out}: " + ", ".join(["results.json", "table.md", *drawn]))
    return per_seed


def learning_curves(args, seeds, methods, per_seed):
    """curves.png: each method's pre-trainings, one per seed; None before any has a log."""
    runs = {m: [seed_dir(args, k) / m / "pretrain" for k in seeds
                if (seed_dir(args, k) / m / "pretrain" / "log.jsonl").exists()] for m in methods}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return None
    flops = {m: 1e9 * per_seed[0][m]["gflop_per_image"] for m in runs}  # training, per image
    note = (f"{args.model}/p{args.patch_size}, batch {args.batch_size}, lr {args.lr:g} per 256, "
            f"{epochs_text(args.epochs)} of pre-training; seeds {', '.join(map(str, seeds))}; "
            f"from each pre-training's log.jsonl in {args.out}")
    return figure(runs, args.batch_size, flops, note)


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    args = None
    try:
        args = get_args(argv)
        check(args)
        ds = load_dataset("cifar10", args.data_dir)  # a missing dataset fails now, in one line
        out, start = Path(args.out), time.time()
        if not (out / "settings.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            write_json(settings(args), out / "settings.json")
        if args.preset == "gpu" and args.device == "cuda":
            print(f"the gpu preset: {estimate_line(vars(args))}")
        todo = [(a, *stage) for a in (for_seed(args, k) for k in args.seeds)
                for stage in stages(a)]
        for i, (a, m, name, result, run) in enumerate(todo):
            d = Path(a.out) / m
            d.mkdir(parents=True, exist_ok=True)
            if (d / result).exists():
                continue
            done = "#" * i + "." * (len(todo) - i)
            seed = f" (seed {a.seed})" if len(args.seeds) > 1 else ""
            print(f"\n[{done}] stage {i + 1}/{len(todo)}: {m} {name}{seed} "
                  f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
            value = run(m, d, a, ds)
            if value is not None:  # each stage says where it ran: a comparison may span machines
                print(f"  {m} {name}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)))
                write_json(dict(value, machine=machine()), d / result)
        per_seed = summarize(args)
    except (CompareError, DataError, CheckpointError, config.ConfigError, train.TrainError,
            FlagError, FIDError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # bad --out, read-only folder, full disk: finished stages are kept
        print(f"compare.py: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncompare.py: stopped; finished stages are kept in "
              f"{args.out if args else 'the run folder'}: run the same command again to go on",
              file=sys.stderr)
        return 130
    waiting = [m for m in per_seed[0] if any(args.fid and "samples" in r[m] and "fid" not in r[m]
                                             for r in per_seed)]
    if waiting:
        print(f"FID still to score for {', '.join(waiting)}: "
              "get the Inception network (tools/fid.py --help) and rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
