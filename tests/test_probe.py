"""Probes on features where the answer is known, feature extraction, and the CLI."""
import json
import math

import pytest
import torch

import probe
from conftest import run_here, run_script
from model import build_model
from probe import extract_features, fewshot_indices, knn_accuracy, linear_probe, ridge_accuracy


def clusters(n, d=16, k=4, sep=6.0, seed=0, random_labels=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centres = torch.randn(k, d, generator=g) * sep
    x = centres[y] + torch.randn(n, d, generator=g)
    if random_labels:
        y = torch.randint(0, k, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("name", ["ridge", "knn", "linear"])
def test_probes_on_known_answers(name):
    def score(random_labels):
        x, y = clusters(1000, seed=1, random_labels=random_labels)
        xtr, ytr, xte, yte = x[:600], y[:600], x[600:], y[600:]
        if name == "ridge":
            return ridge_accuracy(xtr, ytr, xte, yte, 4)
        if name == "knn":
            return knn_accuracy(xtr, ytr, xte, yte, 4)
        return linear_probe(xtr, ytr, xte, yte, 4, grid=[(0.1, 0.0), (0.01, 1e-4)], epochs=5, log=lambda s: None)[0]
    assert score(random_labels=False) > 0.97  # separable clusters
    assert abs(score(random_labels=True) - 0.25) < 0.08  # chance with 4 classes


@pytest.mark.parametrize("n_train", [40, 300])  # fewer rows than columns (dual form), and more
def test_ridge_matches_a_direct_solution(n_train):
    x, y = clusters(n_train + 200, d=64, sep=1.0, seed=2)
    xtr, ytr, xte, yte = x[:n_train].double(), y[:n_train], x[n_train:].double(), y[n_train:]
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False) + 1e-5
    feat = lambda z: torch.cat([(z - mean) / std, torch.full((len(z), 1), 100.0, dtype=z.dtype)], 1)
    targets = 2 * torch.nn.functional.one_hot(ytr, 4).double() - 1
    w = torch.linalg.lstsq(torch.cat([feat(xtr), 32 * torch.eye(65, dtype=torch.float64)]),
                           torch.cat([targets, torch.zeros(65, 4, dtype=torch.float64)])).solution  # l2 = 32^2
    want = (feat(xte) @ w).argmax(1).eq(yte).double().mean().item()
    assert ridge_accuracy(x[:n_train], ytr, x[n_train:], yte, 4) == pytest.approx(want)
    assert 0.3 < want <= 1


def test_linear_probe_never_touches_test_images_while_choosing(monkeypatch):
    x, y = clusters(500, seed=3)
    test_x, test_y = clusters(100, seed=3)
    trained_on, scored_on = [], []
    real_train, real_acc = probe.train_linear, probe.accuracy
    monkeypatch.setattr(probe, "train_linear", lambda f, *a, **k: trained_on.append(f) or real_train(f, *a, **k))
    monkeypatch.setattr(probe, "accuracy", lambda h, f, t: scored_on.append(f) or real_acc(h, f, t))
    _, chosen = linear_probe(x, y, test_x, test_y, 4, grid=[(0.1, 0.0), (0.01, 0.0)], epochs=2, log=lambda s: None)
    assert chosen["val_images"] == 50
    assert all(f.data_ptr() != test_x.data_ptr() for f in trained_on)
    assert [f is test_x for f in scored_on] == [False, True]  # the grid's validation scores, then one test score
    for f in trained_on[:-1]:  # the grid trains on the first 90% only; validation is the last 10%
        assert torch.equal(f, x[:450])
    assert torch.equal(trained_on[-1], x) and all(torch.equal(f, x[450:]) for f in scored_on[:-1])


def test_linear_heads_are_the_separate_runs_of_torch_sgd():
    """Training the grid together gives each head what torch.optim.SGD (momentum 0.9, weight decay,
    cosine schedule) gives it alone, from the same start and the same batches."""
    x, y = clusters(600, seed=5)
    grid = [(0.1, 0.0), (0.01, 1e-3), (0.5, 1e-4)]
    heads = probe.train_linear(x, y, 4, grid, epochs=3, batch_size=64, seed=7)
    g = torch.Generator().manual_seed(probe.derive_seed(7, probe.Stream.LINEAR_PROBE))
    w0 = torch.empty(4, x.shape[1]).normal_(std=0.01, generator=g).T
    perms = [torch.randperm(len(x), generator=g) for _ in range(3)]
    for h, (lr, wd) in enumerate(grid):
        ref = torch.nn.Sequential(torch.nn.BatchNorm1d(x.shape[1], affine=False), torch.nn.Linear(x.shape[1], 4))
        with torch.no_grad():
            ref[1].weight.copy_(w0.T)
            ref[1].bias.zero_()
        opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / (3 * 9))))
        for perm in perms:
            for i in range(len(x) // 64):
                b = perm[i * 64:(i + 1) * 64]
                loss = torch.nn.functional.cross_entropy(ref(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        assert torch.allclose(heads.weight[h], ref[1].weight.T, atol=1e-5), (lr, wd)
        assert torch.allclose(heads.bias[h, 0], ref[1].bias, atol=1e-5), (lr, wd)
    assert not torch.allclose(heads.weight[0], heads.weight[1], atol=1e-3)  # the settings did differ
    assert torch.allclose(heads.norm.running_mean, ref[0].running_mean) and torch.allclose(heads.norm.running_var, ref[0].running_var)


def test_fewshot_indices():
    y = torch.arange(100) % 5
    idx = fewshot_indices(y, 3, seed=0)
    assert len(idx) == 15 and (torch.bincount(y[idx]) == 3).all()
    assert not torch.equal(idx, fewshot_indices(y, 3, seed=1)) and torch.equal(idx, fewshot_indices(y, 3, seed=0))
    with pytest.raises(Exception, match="--shots 30"):
        fewshot_indices(y, 30)


def test_features_shape_batch_independence_and_t():
    torch.manual_seed(0)
    m = build_model("tiny", 8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "adaLN" in n or "cls_tokens" in n:
                p.normal_(std=0.05)
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    f3 = extract_features(m, images, batch_size=3)
    f7 = extract_features(m, images, batch_size=7)
    assert f3.shape == (11, 192)
    torch.testing.assert_close(f3, f7, rtol=1e-4, atol=1e-5)
    n3 = extract_features(m, images, t=50, batch_size=3)
    torch.testing.assert_close(n3, extract_features(m, images, t=50, batch_size=7), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(n3, f3, atol=1e-3)  # --t reads a noised image at another time input
    assert not torch.allclose(extract_features(m, images, t=500), n3, atol=1e-3)
    assert m.training  # the caller's mode is restored


def test_probe_cli(tiny_run, cifar_dir, tmp_path):
    js = tmp_path / "p.json"
    r = run_script("probe.py", tiny_run / "ckpt.pt", "--data-dir", cifar_dir, "--mode", "all", "--shots", "2",
                   "--seeds", "2", "--json", js)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("# EMA weights of") and len(lines) == 4
    assert lines[1].startswith("linear probe top-1:") and "(CIFAR-10 test, 40 images" in lines[1]
    res = json.loads(js.read_text())
    assert res["feature_dim"] == 192 and res["fewshot"]["shots"] == 2 and len(res["fewshot"]["per_seed"]) == 2
    assert 0 <= res["linear"]["top1"] <= 1 and 0 <= res["knn"]["top1"] <= 1
    r = run_script("probe.py", "--pixels", "--data-dir", cifar_dir, "--mode", "knn")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[1].startswith("20-NN probe top-1:")
    # the test images are class-coloured noise: pixels must beat chance (10%) by far
    assert float(r.stdout.split("top-1: ")[1].split("%")[0]) > 50


@pytest.mark.parametrize("args,message", [
    (["{tmp}/junk.pt"], "not a PyTorch checkpoint"),
    (["--pixels", "--mode", "fewshot", "--shots", "1000"], "--shots 1000"),
    (["--pixels", "--data-dir", "{tmp}/nodata"], "CIFAR-10 not found"),
    ([], "give a checkpoint or --pixels"),
])
def test_probe_cli_errors(args, message, cifar_dir, tmp_path):
    (tmp_path / "junk.pt").write_text("junk")
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--data-dir" not in argv:
        argv += ["--data-dir", str(cifar_dir)]
    r = run_here("probe.py", *argv)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
