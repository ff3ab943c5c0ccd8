"""DDIM, guidance, pictures, the fine-tune path and the sample.py CLI."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import config
import train
from conftest import one_error_line, run_here, run_script
from corruption import cosine_alphas_cumprod
from sample import ddim_sample, ddim_step, ddim_timesteps, guided, save_grid

AC = cosine_alphas_cumprod()


def test_timestep_sequences():
    assert ddim_timesteps(125)[:3] == [999, 991, 983] and ddim_timesteps(125)[-2:] == [7, 0]
    assert len(ddim_timesteps(125)) == 126
    assert ddim_timesteps(1) == [999, 0]
    assert ddim_timesteps(4) == [999, 749, 499, 249, 0]
    assert ddim_timesteps(7) == [999, 857, 714, 571, 428, 285, 142, 0]
    ts = ddim_timesteps(1000)
    assert ts == list(range(999, -1, -1)) and len(ts) == 1000
    for s in (1, 3, 7, 50, 125, 250, 300, 600, 999, 1000):
        ts = ddim_timesteps(s)
        assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
        assert len(ts) - 1 == min(s, 999)  # S transitions (999 at most: there are 1000 steps)
        assert max(a - b for a, b in zip(ts, ts[1:])) <= -(-1000 // s)  # evenly spaced: no jump to 0


def test_one_ddim_step_by_hand():
    x, eps, noise = torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([-1.2])
    a, a_next = 0.64, 0.81
    x0 = (0.3 - 0.6 * 0.5) / 0.8  # = 0.0
    sigma = math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
    want = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sigma ** 2) * 0.5 + sigma * -1.2
    x_next, x0_hat = ddim_step(x, eps, a, a_next, 1.0, noise)
    assert x0_hat.item() == pytest.approx(x0, abs=1e-7) and x_next.item() == pytest.approx(want, rel=1e-6)
    # eta = 0 is deterministic DDIM; x0 outside [-1, 1] is clipped and eps recomputed from it
    x_next, x0_hat = ddim_step(torch.tensor([2.0]), torch.tensor([0.0]), a, a_next, 0.0, noise)
    assert x0_hat.item() == 1.0 and x_next.item() == pytest.approx(0.9 + math.sqrt(0.19) * (2.0 - 0.8) / 0.6)


class OracleEps(nn.Module):
    """Knows the image the sampler should end at and returns the exact noise of every input."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.num_classes, self.dummy = x0, None, nn.Parameter(torch.zeros(()))

    def forward(self, x, time_in, y=None):
        a = AC[time_in - 1].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return torch.cat([torch.zeros_like(x), eps], 1)


@pytest.mark.parametrize("steps", [1, 10, 125])
def test_oracle_eps_returns_x0_exactly(steps):
    x0 = torch.rand(4, 3, 8, 8) * 1.8 - 0.9
    out = ddim_sample(OracleEps(x0), x0.shape, steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


class Affine(nn.Module):
    num_classes = 10

    def forward(self, x, t, y):
        return x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1).float()


def test_guidance_scales():
    m, x, y = Affine(), torch.randn(3, 6, 4, 4), torch.tensor([1, 2, 3])
    cond = m(x, torch.full((3,), 6), y)
    uncond = m(x, torch.full((3,), 6), torch.full((3,), 10))
    torch.testing.assert_close(guided(m, x, 5, y, 1.0), cond)
    torch.testing.assert_close(guided(m, x, 5, y, 0.0), uncond)
    torch.testing.assert_close(guided(m, x, 5, y, 3.0), uncond + 3 * (cond - uncond))
    torch.testing.assert_close(guided(m, x, 5, y, None), cond)


def test_grid_pixel_size(tmp_path):
    shape = save_grid(torch.zeros(10, 3, 32, 32), tmp_path / "g.png", ncol=4)
    assert shape == (3 * 34 + 2, 4 * 34 + 2, 3)
    assert Image.open(tmp_path / "g.png").size == (4 * 34 + 2, 3 * 34 + 2)


def test_finetune_loads_pretrained_weights_and_trains(tiny_run, cifar_dir, tmp_path):
    out = tmp_path / "ft"
    args = config.resolve(config.get_args(["--finetune", str(tiny_run / "ckpt.pt"), "--data-dir", str(cifar_dir),
                                           "--recipe", "gpu", "--out", str(out)]))
    from data import load_dataset
    model, ema, _ = train.build(args, load_dataset("cifar10", cifar_dir), torch.device("cpu"), None)
    pre = torch.load(tiny_run / "ckpt.pt", weights_only=True)["model"]
    state = model.state_dict()
    assert model.num_classes == 10 and state["y_embed.weight"].shape == (11, 192)
    assert all(torch.equal(state[k], v) for k, v in pre.items())  # every pre-trained weight carried over
    # the fresh label embedding is flax's nn.Embed default, N(0, 1/d): a small push on the condition
    assert abs(state["y_embed.weight"].std().item() * 192 ** 0.5 - 1) < 0.1
    r = run_script("train.py", "--finetune", tiny_run / "ckpt.pt", "--data-dir", cifar_dir, "--batch-size", "32",
                   "--recipe", "gpu", "--lr", "1e-2", "--warmup", "0", "--max-steps", "6", "--log-every", "2", "--device", "cpu",
                   "--probe-every", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["num_classes"] == 10
    assert not torch.equal(ckpt["model"]["y_embed.weight"], state["y_embed.weight"])  # the labels are learned
    assert ckpt["config"]["train"]["r_t0"] == 0.05 and ckpt["config"]["train"]["label_dropout"] == 0.1
    # the official fine-tune EMA starts at the loaded weights and moves 1e-4 * 32 / 256 per step:
    # after 6 steps it is still the pre-trained network, while the raw weights have moved
    raw_moved = max((ckpt["model"][k] - v).abs().max().item() for k, v in pre.items())
    ema_moved = max((ckpt["ema"][k] - v).abs().max().item() for k, v in pre.items())
    assert raw_moved > 3e-3 and ema_moved < 1e-4, (raw_moved, ema_moved)


@pytest.fixture(scope="module")
def ft_run(tiny_run, cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    r = run_script("train.py", "--finetune", tiny_run / "ckpt.pt", "--data-dir", cifar_dir, "--batch-size", "32",
                   "--max-steps", "2", "--probe-every", "0", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    return out / "ckpt.pt"


def test_sample_cli(tiny_run, ft_run, cifar_dir, tmp_path):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    r = run_script("sample.py", "--ckpt", tiny_run / "ckpt.pt", "--n", "4", "--steps", "3", "--out", png, "--npz", npz)
    assert r.returncode == 0, r.stderr
    assert Image.open(png).size == (2 * 34 + 2, 2 * 34 + 2) and "wrote" in r.stdout
    s = np.load(npz)["samples"]
    assert s.shape == (4, 32, 32, 3) and s.dtype == np.uint8
    r = run_script("sample.py", "--ckpt", ft_run, "--n", "20", "--steps", "2", "--cfg-scale", "2", "--out", png)
    assert r.returncode == 0, r.stderr
    assert Image.open(png).size == (2 * 34 + 2, 10 * 34 + 2)  # one row per class, 2 per row
    r = run_script("sample.py", "--ckpt", tiny_run / "ckpt.pt", "--reconstruct", "--n", "3", "--data-dir", cifar_dir,
                   "--out", png)
    assert r.returncode == 0, r.stderr
    assert Image.open(png).size == (11 * 34 + 2, 3 * 34 + 2)  # 3 + 2 x 4 columns


@pytest.mark.parametrize("args,message", [
    (["--cfg-scale", "2"], "unconditional"),
    (["--class-label", "1"], "unconditional"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "1001"], "--steps 1001"),
    (["--eta", "1.5"], "--eta 1.5"),
    (["--fid", "25", "--ckpt", "{ft}"], "multiple of the 10 classes"),
    (["--ckpt", "{tmp}/nothing.pt"], "no such file"),
])
def test_sample_cli_errors(args, message, tiny_run, ft_run, tmp_path):
    argv = [a.format(tmp=tmp_path, ft=ft_run) for a in args]
    if "--ckpt" not in argv:
        argv += ["--ckpt", str(tiny_run / "ckpt.pt")]
    r = run_here("sample.py", *argv)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_class_label_out_of_range(ft_run):
    r = run_here("sample.py", "--ckpt", ft_run, "--class-label", "10", "--steps", "1")
    assert r.returncode == 2 and "0..9" in r.stderr


def test_sample_fid(ft_run, cifar_dir, standin, tmp_path):
    r = run_script("sample.py", "--ckpt", ft_run, "--fid", "20", "--steps", "2", "--cfg-scale", "2", "--inception",
                   standin, "--data-dir", cifar_dir, "--out", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
    res = json.loads((ft_run.parent / "fid-20-steps2-cfg2.json").read_text())
    assert res["n"] == 20 and res["fid"] > 0 and res["cfg_scale"] == 2 and res["reference"] == "cifar10-train"
    assert f"FID-20 against CIFAR-10 train: {res['fid']:.2f}" in r.stdout
    assert Image.open(tmp_path / "s.png").size == (2 * 34 + 2, 10 * 34 + 2)  # one row per class
    # without --cfg-scale (conditional samples, no guidance) the file name has no cfg tag
    r = run_script("sample.py", "--ckpt", ft_run, "--fid", "20", "--steps", "1", "--inception", standin,
                   "--data-dir", cifar_dir, "--out", tmp_path / "u.png")
    assert r.returncode == 0, r.stderr
    assert json.loads((ft_run.parent / "fid-20-steps1.json").read_text())["cfg_scale"] is None
    # a missing network fails at once, before any sampling
    r = run_here("sample.py", "--ckpt", ft_run, "--fid", "20", "--inception", tmp_path / "none.pt")
    assert r.returncode == 2 and "no such Inception file" in one_error_line(r, "sample.py")
