"""Methods, recipes and flags of train.py: every default in one place (METHODS, RECIPES and
RUN_DEFAULTS below; the --help text is made from them).

A run's settings come, for each one, from the flag if it was given, else from the method preset
(METHODS), else from the recipe's column (RECIPES); --resume takes the saved run's settings.
The recipes take the official hyper-parameters (github.com/philippe-eecs/small-vision:
big_vision/configs/ae_i1k.py, written for ImageNet, and the fine-tuning commands of its README)
to CIFAR-10, and add a CPU version of each.
"""
import argparse
from pathlib import Path

import torch

from machinery import check_finite
from model import SIZES, CheckpointError, read_checkpoint

# Every method is a setting of the one UMD step (corruption.py; README "The idea in one screen").
# mask_ratio_t0 is unused where r_t0 = 0 (no noise-free step), mask_ratio where r_t0 = 1.
METHODS = {
    "umd": dict(r_t0=0.5, mask_ratio_t0=0.75, mask_ratio=0.375),
    "mae": dict(r_t0=1.0, mask_ratio_t0=0.75, mask_ratio=0.0),
    "dit": dict(r_t0=0.0, mask_ratio_t0=0.75, mask_ratio=0.0),
    "maskdit": dict(r_t0=0.0, mask_ratio_t0=0.75, mask_ratio=0.5),
}
# The fine-tune: 5% on the masked noise-free step where the method has one; noisy images unmasked.
FINETUNE_METHODS = {m: dict(r_t0=0.05 if s["r_t0"] > 0 else 0.0, mask_ratio=0.0)
                    for m, s in METHODS.items()}
# dit and maskdit never see a clean image: probes read their features of x_t at t = 50.
NOISY_READOUT_T = 50

# Every other default, in one place; the --help text is made from this table. Columns:
#   gpu           the official pre-training recipe, on CIFAR-10 at small/2 (a 16x16 token grid)
#   cpu           beats raw pixels on the linear and ridge probes in about 33 minutes on 2 cores
#   finetune-gpu  the official class-conditional fine-tune
#   finetune-cpu  about 10 minutes of it on 2 cores, enough to see guidance at work
# -: model and patch size come from the pre-trained checkpoint; the EMA decay is the official
# fine-tune's 1 - 1e-4 * batch_size / 256 (README "Where we follow the official code").
COLUMNS = ("gpu", "cpu", "finetune-gpu", "finetune-cpu")
RECIPES = dict(
    model=        ("small", "tiny", None,  None,   "network size (-: the checkpoint's)"),
    patch_size=   (2,      4,      None,   None,   "patch size in pixels (-: the checkpoint's)"),
    epochs=       (800.0,  2.5,    50.0,   0.6,    "length of the schedule in epochs"),
    batch_size=   (1024,   128,    256,    128,    "global batch size (all processes)"),
    lr=           (1.5e-4, 1e-3,   1.5e-4, 5e-4,   "per 256 images: peak = lr * batch_size / 256"),
    warmup=       (0.05,   0.05,   0.04,   0.04,   "linear warm-up fraction, then cosine to 0"),
    beta2=        (0.95,   0.95,   0.999,  0.999,  "AdamW beta2 (beta1 0.9)"),
    weight_decay= (0.05,   0.05,   0.0,    0.0,    "weight decay (0 on biases, cls/mask tokens)"),
    min_area=     (0.8,    0.8,    0.95,   0.95,   "random-resized crop: smallest area fraction"),
    label_dropout=(0.0,    0.0,    0.1,    0.1,    "labels replaced by the null class (for CFG)"),
    ema_decay=    (0.9999, 0.9999, None,   0.99,   "EMA decay (-: 1 - 1e-4 * batch_size / 256)"),
    ema_warmup=   (True,   True,   False,  False,  "EMA warm-up: min(decay, (1+step)/(10+step))"),
    grad_clip=    (1.0,    1.0,    1.0,    1.0,    "gradient norm clip"),
    probe_every=  (10.0,   0.5,    10.0,   0.0,    "epochs between in-training probes (0 = off)"),
    log_every=    (50,     20,     50,     20,     "steps between log lines"),
)
# The same in every recipe.
RUN_DEFAULTS = dict(dataset="cifar10", data_dir="./data", img_size=32, seed=0, ckpt_minutes=10.0,
                    device="auto", grad_accum=1)
# Flags a resumed run may change (they do not change the recipe). max_steps is a stop, not
# a setting: a resumed run without it runs to the end. grad_accum changes only the random draws
# (as the number of processes does), so a run that ran out of memory can go on with more.
RUNTIME_FLAGS = ("max_steps", "log_every", "device", "compile", "amp", "probe_every",
                 "ckpt_minutes", "data_dir", "grad_accum")


class ConfigError(Exception):
    """Impossible or conflicting settings: one line, exit status 2."""


def get_args(argv=None):
    """Every flag defaults to None, so that resolve() knows which ones the user gave."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    d = {k: f" (default {v})" for k, v in RUN_DEFAULTS.items()}
    a("--dataset", choices=["cifar10", "folder"],
      help="cifar10, or folder: --data-dir/<class>/<image>" + d["dataset"])
    a("--data-dir", help="where cifar-10-batches-py lives or is downloaded" + d["data_dir"])
    a("--img-size", type=int, help="image size for --dataset folder" + d["img_size"])
    a("--method", choices=list(METHODS),
      help="loss preset (default umd; on --finetune, the checkpoint's)")
    a("--recipe", choices=["auto", "gpu", "cpu"],
      help="the column of defaults for flags not given; "
           "auto (default): gpu with CUDA, else cpu")
    a("--r-t0", type=float,
      help="share of each batch on the noise-free step (from --method; umd 0.5)")
    a("--mask-ratio-t0", type=float,
      help="patches dropped on the noise-free step (from --method; 0.75)")
    a("--mask-ratio", type=float,
      help="patches dropped on noisy steps (from --method; umd 0.375)")
    for key, (*values, what) in RECIPES.items():
        kind = argparse.BooleanOptionalAction if isinstance(values[0], bool) else None
        typ = None if kind else str if isinstance(values[0], str) else type(values[0])
        choices = list(SIZES) if key == "model" else None
        shown = "; ".join(f"{c} {'-' if v is None else format(v, 'g') if type(v) is float else v}"
                          for c, v in zip(COLUMNS, values))
        a(f"--{key.replace('_', '-')}", type=typ, action=kind, choices=choices,
          help=f"{what} ({shown})".replace("%", "%%"))
    a("--max-steps", type=int,
      help="stop after global step N (the schedule still follows --epochs)")
    a("--finetune", metavar="CKPT",
      help="class-conditional fine-tune from this pre-trained checkpoint")
    a("--out", help="run directory (default runs/<method>-<model>-p<patch>[-ft])")
    a("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    a("--seed", type=int,
      help="fixes init, data order, augmentation, masks, noise and t" + d["seed"])
    a("--ckpt-minutes", type=float, help="minutes between checkpoints" + d["ckpt_minutes"])
    a("--device", choices=["auto", "cuda", "cpu"], help="auto: cuda when available" + d["device"])
    a("--grad-accum", type=int, metavar="N",
      help="split each step's batch into N micro-batches, one after another (same recipe, less "
           "memory)" + d["grad_accum"])
    a("--compile", action=argparse.BooleanOptionalAction,
      help="torch.compile (default: on with CUDA or a CPU with native bf16)")
    a("--amp", choices=["bf16", "fp16", "off"],
      help="autocast (default: bf16 on CUDA or a CPU with native bf16, else off)")
    return p.parse_args(argv)


def resolve(args):
    """The run's settings: the saved ones on --resume; else, for each setting, the flag if given,
    then the method preset, then the recipe's column. Checked here, before anything is built."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if args.resume:
        return resume_settings(args, given)
    s = argparse.Namespace(**vars(args))
    if s.finetune:
        if s.model or s.patch_size:
            raise ConfigError("--model and --patch-size come from the --finetune checkpoint; "
                              "drop them")
        pre = read_checkpoint(s.finetune)["config"]
        if pre["model"].get("num_classes") is not None:  # its label embedding would be replaced
            raise ConfigError(f"--finetune {s.finetune} is already fine-tuned with labels; "
                              "pass the pre-trained checkpoint it came from")
        s.method = s.method or pre.get("train", {}).get("method", "umd")
        s.model, s.patch_size = pre["model"]["size"], pre["model"]["patch_size"]
    s.method = s.method or "umd"
    if s.recipe in (None, "auto"):  # the device alone decides; flags given keep their values
        s.recipe = "gpu" if torch.cuda.is_available() and s.device != "cpu" else "cpu"
    column = COLUMNS.index(("finetune-" if s.finetune else "") + s.recipe)
    preset = {**METHODS[s.method], **(FINETUNE_METHODS[s.method] if s.finetune else {})}
    for key, value in {**{k: v[column] for k, v in RECIPES.items()}, **preset}.items():
        if getattr(s, key) is None:
            setattr(s, key, value)
    if s.ema_decay is None:  # the official fine-tune EMA: step size 1e-4 per 256 images
        s.ema_decay = 1 - 1e-4 * s.batch_size / 256
    for key, value in RUN_DEFAULTS.items():
        if getattr(s, key) is None:
            setattr(s, key, value)
    s.out = s.out or str(Path("runs") / (f"{s.method}-{s.model}-p{s.patch_size}"
                                         + ("-ft" if s.finetune else "")))
    if (Path(s.out) / "ckpt.pt").exists():
        raise ConfigError(f"{s.out} already holds a run; "
                          "pass --resume to continue it or --out for a new one")
    check(s)
    return s


def resume_settings(args, given):
    """The saved run's settings, with the runtime flags that were given on the command line."""
    if args.out is None:
        raise ConfigError("--resume needs --out, the run directory to continue")
    out = Path(args.out)
    if not (out / "ckpt.pt").exists():
        raise ConfigError(f"--resume: no checkpoint at {out / 'ckpt.pt'}; "
                          "start the run without --resume")
    saved = read_checkpoint(out / "ckpt.pt")["config"].get("train")
    if not isinstance(saved, dict) or not set(RECIPES) <= set(saved):
        raise CheckpointError(f"{out / 'ckpt.pt'} holds no training settings of this train.py; "
                              "start a new run")
    changed = [k for k, v in given.items()
               if k not in RUNTIME_FLAGS and k != "out" and v != saved.get(k)
               and not (k == "recipe" and v == "auto")]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ConfigError(f"{flags} cannot change on --resume (a resumed run keeps its settings); "
                          "drop them or start a new run")
    s = argparse.Namespace(**{"grad_accum": 1, **saved, "max_steps": None, **given, "out": str(out),
                              "resume": True})
    check(s)
    return s


def check(s):
    """One clear line for every impossible setting, before anything is built."""
    check_finite(s, ConfigError)
    if not 0 <= s.r_t0 <= 1 or not 0 <= s.mask_ratio < 1 or not 0 <= s.mask_ratio_t0 < 1:
        raise ConfigError("--r-t0 must be in [0, 1] and the mask ratios in [0, 1)")
    if s.r_t0 > 0 and s.mask_ratio_t0 == 0:
        raise ConfigError("the noise-free step (--r-t0 > 0) needs --mask-ratio-t0 > 0: "
                          "it predicts masked patches")
    if s.epochs <= 0 or s.batch_size <= 0 or s.lr <= 0 or s.log_every <= 0:
        raise ConfigError("--epochs, --batch-size, --lr and --log-every must be positive")
    if (not 0 <= s.warmup <= 1 or not 0 <= s.ema_decay < 1 or not 0 <= s.label_dropout <= 1
            or not 0 < s.min_area <= 1):
        raise ConfigError("--warmup, --ema-decay and --label-dropout must be in [0, 1] "
                          "(decay < 1), --min-area in (0, 1]")
    if not 0 <= s.beta2 < 1 or s.weight_decay < 0 or s.grad_clip <= 0 or s.img_size < 1:
        raise ConfigError("--beta2 must be in [0, 1), --weight-decay >= 0, "
                          "--grad-clip and --img-size positive")
    if s.max_steps is not None and s.max_steps < 1:
        raise ConfigError("--max-steps must be at least 1")
    if s.grad_accum < 1:
        raise ConfigError("--grad-accum must be at least 1")
    if s.patch_size < 1 or s.img_size % s.patch_size:
        raise ConfigError(f"--patch-size {s.patch_size} must divide the image size {s.img_size} "
                          "(e.g. 2, 4, 8)")
    L = (s.img_size // s.patch_size) ** 2  # a step keeps int(L * (1 - ratio)) patches
    for flag, ratio, used in (("--mask-ratio-t0", s.mask_ratio_t0, s.r_t0 > 0),
                              ("--mask-ratio", s.mask_ratio, s.r_t0 < 1)):
        keep = int(L * (1 - ratio))
        if used and (keep < 1 or (ratio > 0 and keep == L)):
            raise ConfigError(f"{flag} {ratio:g} keeps {keep} of {L} patches; a step needs at "
                              "least one patch seen and, when masking, one hidden")
    if s.probe_every < 0 or s.ckpt_minutes < 0:
        raise ConfigError("--probe-every and --ckpt-minutes must be >= 0")
