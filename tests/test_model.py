"""The network: shapes, what the encoder sees, conditioning, checkpoints, compile, learning."""
import shutil

import pytest
import torch

from conftest import SHALLOW
from corruption import cosine_alphas_cumprod, random_masking, umd_loss
from model import SIZES, CheckpointError, build_model, load_checkpoint

torch.manual_seed(0)


def randomize_adaln(model):
    """adaLN-Zero starts every block as the identity; give the gates values so that the time
    input and the blocks actually act (as after training)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(std=0.05)
    return model


def test_output_shape_and_param_counts():
    m = build_model("tiny", 4)
    x = torch.randn(3, 3, 32, 32)
    out = m(x, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 6, 32, 32)
    assert m.features(x).shape == (3, 192)
    assert SIZES["small"] == (384, 12, 4, 6) and SIZES["base"] == (768, 12, 4, 12)
    n = sum(p.numel() for p in build_model("small", 2).parameters())
    assert 42e6 < n < 45e6  # S/2: 16 blocks of 12 d^2 (attention, MLP) + 6 d^2 (adaLN), d = 384
    # no buffers: DDP would sync them in every forward, and ranks run one or two forwards a step
    assert not list(build_model("tiny", 4, num_classes=10).buffers())


def test_encoder_sees_only_class_and_visible_tokens():
    m = randomize_adaln(build_model("tiny", 4).eval())
    seen = {}
    m.encoder[0].register_forward_hook(lambda mod, inp, out: seen.__setitem__("enc", inp[0].shape))
    m.decoder[0].register_forward_hook(lambda mod, inp, out: seen.__setitem__("dec", inp[0].shape))
    ids_keep, mask, ids_restore = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    t = torch.zeros(2, dtype=torch.long)
    out = m(x, t, None, ids_keep, ids_restore)
    assert seen["enc"] == (2, 4 + 16, 192)  # 4 class tokens + 16 visible of 64 patches
    assert seen["dec"] == (2, 1 + 64, 192)  # representation token + every patch slot
    # changing the pixels of masked patches changes nothing: the encoder never saw them
    pix = mask.view(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    x2 = x + 10 * pix * torch.randn_like(x)
    torch.testing.assert_close(m(x2, t, None, ids_keep, ids_restore), out)
    assert not torch.allclose(m(x2, t), m(x, t))  # ... while without a mask it does


def test_time_and_label_inputs_reach_the_network():
    m = randomize_adaln(build_model("tiny", 4, num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    t0, t1, t2 = (torch.full((2,), v) for v in (0, 1, 500))
    assert not torch.allclose(m(x, t0), m(x, t1))  # 0 (clean) and 1 (t = 0 noised) are different inputs
    assert not torch.allclose(m(x, t1), m(x, t2))
    y = torch.tensor([3, 3])
    assert not torch.allclose(m(x, t1, y), m(x, t1))
    torch.testing.assert_close(m(x, t1, torch.tensor([10, 10])), m(x, t1))  # no label = the null label
    assert not torch.allclose(m.features(x), m.features(x, t2))


def test_adaln_zero_init():
    m = build_model("tiny", 4)
    x = torch.randn(2, 3, 32, 32)
    # blocks start as the identity, so the output is independent of the time input
    torch.testing.assert_close(m(x, torch.zeros(2, dtype=torch.long)), m(x, torch.full((2,), 700)))


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    m = randomize_adaln(build_model("tiny", 4))
    ema = randomize_adaln(build_model("tiny", 4))
    ckpt = {"model": m.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "step": 3, "epoch": 0.1,
            "config": {"model": m.config, "train": {"method": "umd"}}}
    torch.save(ckpt, tmp_path / "c.pt")
    loaded, raw = load_checkpoint(tmp_path / "c.pt")
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 5)
    torch.testing.assert_close(loaded(x, t), ema.eval()(x, t))  # EMA weights by default
    torch.testing.assert_close(load_checkpoint(tmp_path / "c.pt", ema=False)[0](x, t), m.eval()(x, t))
    assert raw["step"] == 3 and not loaded.training
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    for bad in ("junk.pt", "other.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / bad)


def test_compiled_model_matches_eager_and_saves_without_prefix(tmp_path, monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", SHALLOW)  # inductor lowers every block alike
    m = randomize_adaln(build_model("tiny", 8))
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    compiled = torch.compile(m, dynamic=False)
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 7)
    out = compiled(x, t)
    torch.testing.assert_close(out, m(x, t), rtol=1e-4, atol=1e-4)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state = m.state_dict()  # what train.py saves: the plain model's, not the compiled one's
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    torch.save({"model": state, "ema": None, "config": {"model": m.config}}, tmp_path / "c.pt")
    torch.testing.assert_close(load_checkpoint(tmp_path / "c.pt")[0](x, t), m.eval()(x, t))


def test_tiny_model_overfits_one_batch():
    """With the corruption fixed (same t, noise and masks every step), the loss on one batch must
    fall by a large factor: the network, the two steps and the loss regions can learn."""
    torch.manual_seed(0)
    m = build_model("tiny", 8)
    x0 = torch.rand(8, 1, 1, 1) * torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(8, 3, 32, 32)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    ac = cosine_alphas_cumprod()
    losses = []
    for _ in range(40):  # here about 1,700x lower after 40 steps
        loss, _ = umd_loss(m, x0, r_t0=0.5, mask_ratio=0.375, mask_ratio_t0=0.75, alphas_cumprod=ac,
                           generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
