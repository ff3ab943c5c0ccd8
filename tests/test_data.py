"""CIFAR-10 parsing and verification, image folders, and the seeded device batches."""
import hashlib
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import write_cifar
from data import Batches, DataError, augment, load_cifar10, load_dataset, load_image_folder, to_float


def test_parses_official_format(tmp_path):
    written = write_cifar(tmp_path, n_per_batch=20)
    ds = load_cifar10(tmp_path)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 3, 32, 32) and ds.num_classes == 10 and ds.classes[0] == "airplane"
    rows, labels = written["data_batch_2"]
    assert torch.equal(ds.train_y[20:40], torch.from_numpy(labels))  # batches in order 1..5
    img = ds.train_x[20 + 7]
    assert torch.equal(img[0].flatten(), torch.from_numpy(rows[7, :1024]))  # rows are R, G, B planes
    assert torch.equal(img[2].flatten(), torch.from_numpy(rows[7, 2048:]))
    assert torch.equal(ds.test_y, torch.from_numpy(written["test_batch"][1]))


@pytest.mark.parametrize("damage", ["labels", "missing", "garbage", "shape"])
def test_damaged_folder_is_a_one_line_error(tmp_path, damage):
    write_cifar(tmp_path, n_per_batch=10)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "missing":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"\x80\x04garbage")
    else:
        import pickle
        d = pickle.loads(f.read_bytes())
        if damage == "labels":
            d[b"labels"][0] = 10
        else:
            d[b"data"] = d[b"data"][:, :1000]
        f.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="data_batch_3") as e:
        load_cifar10(tmp_path)
    assert "\n" not in str(e.value)


class Planted:
    """A pickle that runs a shell command when loaded, as a planted data_batch_1 would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path, protocol):
    import pickle
    from conftest import run_script
    write_cifar(tmp_path, n_per_batch=10)
    ran = tmp_path / "ran"
    f = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    d = pickle.loads(f.read_bytes())
    d[b"labels"] = Planted(f"touch {ran}")
    f.write_bytes(pickle.dumps(d, protocol=protocol))
    with pytest.raises(DataError, match=r"data_batch_1 is not a CIFAR-10 batch \(Unpickling"):
        load_cifar10(tmp_path)
    assert not ran.exists()
    # as a user meets it: one line, exit 2, nothing run
    r = run_script("train.py", "--data-dir", tmp_path, "--out", tmp_path / "run", "--device", "cpu")
    assert r.returncode == 2 and not ran.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and "data_batch_1 is not a CIFAR-10 batch" in r.stderr


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_pickled_by_any_python_3_protocol_load(tmp_path, protocol):
    import pickle
    write_cifar(tmp_path, n_per_batch=10)
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(f.read_bytes())
    f.write_bytes(pickle.dumps(d, protocol=protocol))
    assert torch.equal(load_cifar10(tmp_path).test_x.flatten(1), torch.from_numpy(d[b"data"]))


def make_archive(tmp_path):
    src = tmp_path / "src"
    write_cifar(src, n_per_batch=10)
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_archive_md5_is_verified(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    with pytest.raises(DataError, match="MD5"):  # not the official archive
        load_cifar10(archive.parent)
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = load_cifar10(archive.parent)  # a matching archive is extracted and parsed
    assert ds.train_x.shape == (50, 3, 32, 32) and (archive.parent / "cifar-10-batches-py").is_dir()


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(DataError, match="download") as e:
        load_cifar10(tmp_path / "empty")
    assert "--data-dir" in str(e.value) and not list((tmp_path / "empty").glob("*.part"))
    # it says exactly where the files go
    assert f"put cifar-10-python.tar.gz from http://127.0.0.1:9/cifar-10-python.tar.gz in {tmp_path / 'empty'}/" in str(e.value)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_cifar10(tmp_path / "empty", download=False)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, colour in (("cats", 200), ("dogs", 30)):
        (tmp_path / c).mkdir()
        for i in range(12):
            arr = np.full((30, 40, 3), colour, np.uint8) + rng.integers(0, 5, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, 16)
    assert ds.classes == ("cats", "dogs") and ds.train_x.shape[1:] == (3, 16, 16)
    assert len(ds.test_x) == 2 and len(ds.train_x) == 22  # every tenth image of each class is held out
    assert ds.train_x[ds.train_y == 0].float().mean() > 190 and ds.train_x[ds.train_y == 1].float().mean() < 40
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "cats", 16)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, 16)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", tmp_path / "nope", 16)


def test_batches_are_seeded_and_cover_the_epoch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 8, 8).contiguous()
    labels = torch.arange(40)
    b = Batches(images, labels, 8, seed=3, device="cpu", min_area=1.0)
    g = lambda s: torch.Generator().manual_seed(s)
    seen = torch.cat([b.get(s, g(s))[1] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))  # one epoch visits every image once
    x, y = b.get(2, g(0))
    assert torch.equal(x[:, 0, 0, 0], to_float(y.to(torch.uint8).view(-1, 1, 1, 1))[:, 0, 0, 0])
    again = Batches(images, labels, 8, seed=3, device="cpu")
    assert torch.equal(again.get(7, g(1))[1], b.get(7, g(1))[1])
    assert not torch.equal(b.get(5, g(0))[1], b.get(0, g(0))[1])  # a new order in epoch 2
    assert not torch.equal(Batches(images, labels, 8, seed=4, device="cpu").get(0, g(0))[1], b.get(0, g(0))[1])
    # two DDP ranks take the two halves of the same global batch
    halves = [Batches(images, labels, 8, 3, "cpu", world=2).get(6, g(0), r)[1] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), b.get(6, g(0))[1])
    with pytest.raises(DataError):
        Batches(images, labels, 7, 0, "cpu", world=2)


def test_augment_is_crop_and_flip():
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    y = augment(x, 1.0, torch.Generator().manual_seed(0))  # full area: identity or mirror image
    same = (y - x).abs().flatten(1).amax(1) < 1e-5
    flipped = (y - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | flipped).all() and 10 < flipped.sum() < 54
    z = augment(x, 0.8, torch.Generator().manual_seed(0))
    assert z.shape == x.shape and z.min() >= -1 and z.max() <= 1 and not torch.allclose(z, y)
