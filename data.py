"""Data: CIFAR-10 (download, verify, parse) and image folders, held as uint8 tensors; seeded,
augmented training batches made on the device (no DataLoader workers needed at 32x32).

References: CIFAR-10 (Krizhevsky 2009), www.cs.toronto.edu/~kriz/cifar.html, its python version;
the augmentation is the official UMD one (github.com/philippe-eecs/small-vision,
big_vision/configs/ae_i1k.py: inception crop of 80-100% of the area, horizontal flip)."""
import hashlib
import math
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from tqdm import tqdm

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(Exception):
    """A problem with the user's data, reported as one line."""


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple

    @property
    def num_classes(self):
        return len(self.classes)


class Stream:
    """The random streams derived from one --seed: derive_seed(seed, Stream.X, ...) gives each
    purpose its own generator, so changing one (say, a probe) never shifts another (training)."""
    DATA_ORDER = 0    # the permutation of each epoch (Batches)
    STEP = 1          # a training step's augmentation, t, noise, masks, label dropout (train.py)
    PROBE_NOISE = 2   # the noise of features read at t > 0 (probe.py)
    FEWSHOT = 3       # which training images a few-shot probe uses (probe.py)
    LINEAR_PROBE = 4  # the linear probe's initialisation and batch order (probe.py)
    INIT = 6          # the network's initialisation (train.py); 5 stays unused


def derive_seed(*parts):
    """A 63-bit seed from integers (seed, Stream.X, step, ...): one independent stream each."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def to_float(x):
    """uint8 images -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def load_dataset(name, data_dir, img_size=32, download=True):
    if name == "cifar10":
        if img_size != 32:
            raise DataError(f"CIFAR-10 images are 32x32, the model expects {img_size}; "
                            "drop --img-size")
        return load_cifar10(data_dir, download)
    if name == "folder":
        return load_image_folder(data_dir, img_size)
    raise DataError(f"unknown dataset {name!r}; use cifar10 or folder")


def load_dataset_once(name, data_dir, img_size, rank=0, world=1):
    """load_dataset under DDP: rank 0 downloads and verifies first, then the others read; an
    error reaches every rank (instead of leaving them waiting for rank 0)."""
    ds, error = None, None
    if rank == 0:
        try:
            ds = load_dataset(name, data_dir, img_size)
        except DataError as e:
            error = str(e)
    if world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise DataError(error)
    return ds if ds is not None else load_dataset(name, data_dir, img_size, download=False)


# ---------------------------------------------------------------------------- CIFAR-10
def load_cifar10(data_dir, download=True):
    root = Path(data_dir) / "cifar-10-batches-py"
    if not root.is_dir():
        archive = Path(data_dir) / "cifar-10-python.tar.gz"
        if not archive.exists():
            if not download:
                raise DataError(f"CIFAR-10 not found in {data_dir}: expected {root} or {archive}; "
                                "download it or pass --data-dir")
            _download(CIFAR_URL, archive)
        digest = file_digest(archive)
        if digest != CIFAR_MD5:
            raise DataError(f"{archive} is corrupt (MD5 {digest}, expected {CIFAR_MD5}); "
                            "delete it and run again")
        with tarfile.open(archive) as tar:
            # the "data" filter (where Python has it) refuses links and paths outside data_dir
            tar.extractall(data_dir,
                           **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    parts = [_read_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_batch(root / "test_batch")
    if len({len(p[1]) for p in parts}) != 1:  # the official batches hold 10,000 images each
        raise DataError(f"the training batches in {root} differ in size "
                        f"({[len(p[1]) for p in parts]}); "
                        "delete the folder and run again to re-download")
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return Dataset(train_x, train_y, test_x, test_y, CIFAR_CLASSES)


class BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (builtin containers, numpy arrays) and nothing else:
    a plain pickle.load would run any function a planted file names (torchvision checks each
    file's MD5 instead; our folder may come from get-cifar10 or a copy, so we check the content)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}  # the last three: arrays and bytes pickled by Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_batch(path):
    """One pickle of the official python version: uint8 [10000, 3072] rows of R, G, B planes."""
    hint = f"delete {path.parent} and run again to re-download"
    if not path.exists():
        raise DataError(f"{path} is missing: the CIFAR-10 folder is incomplete; {hint}")
    try:
        with open(path, "rb") as f:
            d = BatchUnpickler(f, encoding="bytes").load()
        x, y = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}); {hint}")
    if (x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y) or len(y) == 0 or y.min() < 0
            or y.max() > 9):
        raise DataError(f"{path} has the wrong shape or labels "
                        f"(data {x.shape}, labels 0..9 expected); {hint}")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def _download(url, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B",
                      unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"CIFAR-10 not found in {dest.parent} and the download failed ({e}); "
                        f"put {dest.name} from {url} in {dest.parent}/ (or its unpacked folder "
                        f"at {dest.parent / 'cifar-10-batches-py'}), or pass --data-dir")
    os.replace(tmp, dest)


def file_digest(path, algorithm="md5"):
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- image folders
def load_image_folder(root, img_size, test_fraction=0.1):
    """root/<class>/<image>: every image resized (short side) and centre-cropped to img_size.
    A fixed 10% of each class (every tenth image in name order) is held out as the test split."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; "
                        "pass --data-dir with one subfolder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise DataError(f"no images found in subfolders of {root}; "
                        f"expected {root}/<class>/<image>.png")
    xs = []
    for f, _ in tqdm(files, desc=f"reading {root}", disable=len(files) < 1000):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                s = img_size / min(im.size)
                im = im.resize((max(img_size, round(im.width * s)),
                                max(img_size, round(im.height * s))), Image.BICUBIC)
                l, t = (im.width - img_size) // 2, (im.height - img_size) // 2
                xs.append(np.asarray(im.crop((l, t, l + img_size, t + img_size))))
        except (OSError, Image.DecompressionBombError) as e:  # damaged, or absurdly large
            raise DataError(f"cannot read image {f} ({e}); remove it or fix it")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([i for _, i in files])
    every, seen, test = round(1 / test_fraction), [0] * len(classes), []
    for _, i in files:
        seen[i] += 1
        test.append(seen[i] % every == 0)
    test = torch.tensor(test)
    if not test.any():
        raise DataError(f"{root}: too few images for a test split (every tenth image of a class is "
                        "held out); give at least one class 10 images or more")
    return Dataset(x[~test], y[~test], x[test], y[test], tuple(classes))


# ---------------------------------------------------------------------------- device batches
class Batches:
    """Seeded training batches made on the device from a uint8 copy of the training set.

    Epoch e visits the images in the permutation seeded by derive_seed(seed, Stream.DATA_ORDER, e);
    step s is batch s % steps_per_epoch of epoch s // steps_per_epoch, so any step can be rebuilt
    from (seed, s) alone: that is what makes --resume exact. The global batch is split into
    `world` equal slices (DDP ranks, or their micro-batches): get(step, g, rank) is rank's slice.
    The augmentation uses the caller's generator."""

    def __init__(self, images, labels, batch_size, seed, device, min_area=0.8, world=1):
        if batch_size % world:
            raise DataError(f"--batch-size {batch_size} does not split into {world} equal parts "
                            "(processes x --grad-accum)")
        if len(images) < batch_size:
            raise DataError(f"--batch-size {batch_size} is larger than the {len(images)} "
                            "training images")
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.seed, self.min_area, self.world = batch_size, seed, min_area, world
        self.steps_per_epoch = len(images) // batch_size  # the last partial batch is dropped
        self._epoch, self._perm = None, None

    def get(self, step, generator, rank=0):
        """(x0 float [b, C, H, W] in [-1, 1], labels [b]): rank's slice of the global batch of
        `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, Stream.DATA_ORDER, epoch))
            self._epoch, self._perm = (
                epoch, torch.randperm(len(self.images), generator=g).to(self.images.device))
        b = self.batch_size // self.world
        idx = self._perm[i * self.batch_size + rank * b:][:b]
        return augment(to_float(self.images[idx]), self.min_area, generator), self.labels[idx]


def augment(x, min_area, generator=None):
    """Random-resized crop (min_area..100% of the area, aspect 3/4..4/3 where the crop fits)
    and horizontal flip, as one batched affine resampling on the device."""
    B, dev = x.shape[0], x.device
    u = torch.rand(B, 5, device=dev, generator=generator)
    area = min_area + (1 - min_area) * u[:, 0]
    # aspect ratios for which a crop of this area fits in the image: area <= r <= 1 / area
    lo, hi = area.log().clamp(min=math.log(3 / 4)), (-area.log()).clamp(max=math.log(4 / 3))
    r = (lo + (hi - lo) * u[:, 1]).exp()
    w, h = (area * r).sqrt(), (area / r).sqrt()  # crop width and height as fractions of the image
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)  # centre, in [-1, 1]
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
