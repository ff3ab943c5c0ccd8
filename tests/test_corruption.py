"""The schedule, the masking and the UMD loss: every term on the right patches and rows."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from corruption import cosine_alphas_cumprod, q_sample, random_masking, umd_loss
from model import patchify, unpatchify

AC = cosine_alphas_cumprod()


def test_cosine_schedule_matches_closed_form():
    assert AC.dtype == torch.float64 and AC.shape == (1000,)
    f = lambda s: np.cos((s / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1000)
    # without the 0.999 clip, abar[t] = f(t + 1) / f(0) exactly (the product telescopes)
    np.testing.assert_allclose(AC.numpy()[:990], (f(t + 1) / f(0))[:990], rtol=1e-9)
    for step, want, tol in [(0, 0.99996, 1e-5), (50, 0.9917, 1e-4), (500, 0.492, 1e-3)]:
        assert abs(AC[step].item() - want) < tol
    assert AC[999] < 1e-6 and (AC[1:] < AC[:-1]).all()


def test_q_sample():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = q_sample(x0, t, eps, AC)
    for i in range(4):
        a = AC[t[i]].item()
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])
    assert (xt[0] - x0[0]).abs().max() < 0.05 and (xt[3] - eps[3]).abs().max() < 0.01


@pytest.mark.parametrize("L,ratio", [(256, 0.75), (256, 0.375), (64, 0.75), (16, 0.5), (10, 0.0)])
def test_random_masking_invariants(L, ratio):
    B = 5
    ids_keep, mask, ids_restore = random_masking(B, L, ratio, generator=torch.Generator().manual_seed(0))
    n_keep = int(L * (1 - ratio))
    assert ids_keep.shape == (B, n_keep) and mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert (mask.sum(1) == L - n_keep).all()  # exact count in every row
    for b in range(B):
        assert len(set(ids_keep[b].tolist())) == n_keep
        assert (mask[b, ids_keep[b]] == 0).all()  # kept patches are not masked ...
        assert mask[b].sum() + n_keep == L  # ... and every other patch is
    # ids_restore inverts the shuffle: kept tokens + mask tokens, gathered, return to patch order
    x = torch.arange(L).expand(B, L)
    kept = torch.gather(x, 1, ids_keep)
    dropped = x[mask.bool()].view(B, -1)
    shuffled = torch.cat([kept, torch.full_like(dropped, -1)], 1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert ((restored == x) | (restored == -1)).all() and ((restored == -1) == mask.bool()).all()
    if 0 < ratio and L > 16:
        assert not torch.equal(mask[0], mask[1])  # a mask of its own per image
    again = random_masking(B, L, ratio, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_keep)


class Oracle(nn.Module):
    """Knows the clean batch and so the true x0 and eps of every input; answers correctly only
    where `good` says (a function of the pixel mask), and records what reached it."""

    def __init__(self, x0, good, patch_size=4, num_classes=None):
        super().__init__()
        self.x0, self.good, self.patch_size, self.num_classes = x0, good, patch_size, num_classes
        self.num_patches = (x0.shape[-1] // patch_size) ** 2
        self.calls = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None, ids_keep=None, ids_restore=None):
        self.calls.append(dict(x=x, t=t, y=y, ids_keep=ids_keep))
        B = x.shape[0]
        x0 = self.x0[-B:] if (t == 0).all() else self.x0[:B]  # the noise-free group is the last rows
        abar = AC[(t - 1).clamp(min=0)].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt() if (t > 0).all() else torch.zeros_like(x)
        L, p = self.num_patches, self.patch_size
        mask = torch.ones(B, L)
        if ids_keep is not None:
            mask.scatter_(1, ids_keep, 0.0)
        else:
            mask.zero_()
        pix = unpatchify(mask[:, :, None].expand(-1, -1, p * p * 3), p, 3)  # 1 on masked pixels
        wrong = 5.0
        x0_hat = torch.where(self.good("x0", pix) > 0, x0, x0 + wrong)
        eps_hat = torch.where(self.good("eps", pix) > 0, eps, eps + wrong)
        return torch.cat([x0_hat, eps_hat], 1) + 0 * self.w


def run(model, x0, **kw):
    args = dict(r_t0=0.5, mask_ratio=0.375, mask_ratio_t0=0.75, alphas_cumprod=AC, generator=torch.Generator().manual_seed(1))
    return umd_loss(model, x0, **{**args, **kw})


X0 = torch.randn(8, 3, 16, 16)


def test_loss_regions_right_answers_where_they_count_give_zero():
    # x0 right only on masked patches, eps right only on visible ones: nothing the loss looks at is wrong
    m = Oracle(X0, lambda head, masked: masked if head == "x0" else 1 - masked)
    loss, stats = run(m, X0)
    assert stats["loss_t0"].item() < 1e-10 and stats["loss_t"].item() < 1e-8 and loss.item() < 1e-8


def test_loss_regions_wrong_answers_where_they_count():
    # x0 wrong on masked patches: L0 = 25 (error 5 on every masked pixel); Lt = 0.5 * 25
    m = Oracle(X0, lambda head, masked: 1 - masked if head == "x0" else 1 - masked)
    loss, stats = run(m, X0)
    assert abs(stats["loss_t0"].item() - 25) < 1e-3 and abs(stats["loss_t"].item() - 12.5) < 1e-3
    assert abs(loss.item() - (0.5 * 25 + 0.5 * 12.5)) < 1e-3
    # eps wrong on visible patches only: Lt = 0.5 * 25, L0 untouched (the eps head is unused at t = 0)
    m = Oracle(X0, lambda head, masked: torch.ones_like(masked) if head == "x0" else masked)
    loss, stats = run(m, X0)
    assert stats["loss_t0"].item() < 1e-10 and abs(stats["loss_t"].item() - 12.5) < 1e-3


def test_batch_split_and_time_inputs():
    m = Oracle(X0, lambda head, masked: torch.ones_like(masked))
    run(m, X0, r_t0=0.25)  # n0 = int(8 * 0.25) = 2: rows 6, 7 are noise-free
    clean, noisy = m.calls
    assert torch.equal(clean["x"], X0[6:]) and (clean["t"] == 0).all()
    assert clean["ids_keep"].shape == (2, int(16 * 0.25))  # 16 patches, 75% dropped
    assert noisy["x"].shape[0] == 6 and ((noisy["t"] >= 1) & (noisy["t"] <= 1000)).all()
    assert noisy["ids_keep"].shape == (6, int(16 * 0.625))
    assert not torch.allclose(noisy["x"], X0[:6])  # noised


@pytest.mark.parametrize("method,r_t0,mask_ratio,calls", [("mae", 1.0, 0.0, 1), ("dit", 0.0, 0.0, 1), ("maskdit", 0.0, 0.5, 1)])
def test_special_cases(method, r_t0, mask_ratio, calls):
    m = Oracle(X0, lambda head, masked: torch.ones_like(masked))
    loss, stats = run(m, X0, r_t0=r_t0, mask_ratio=mask_ratio)
    assert len(m.calls) == calls and loss.item() < 1e-8
    assert set(stats) == ({"loss_t0"} if r_t0 == 1 else {"loss_t"})
    if method == "dit":
        assert m.calls[0]["ids_keep"] is None and (m.calls[0]["t"] >= 1).all()


def test_dit_without_mask_uses_all_patches_for_both_terms():
    m = Oracle(X0, lambda head, masked: torch.zeros_like(masked) if head == "x0" else torch.ones_like(masked))
    _, stats = run(m, X0, r_t0=0.0, mask_ratio=0.0)
    assert abs(stats["loss_t"].item() - 12.5) < 1e-3  # 0.5 * (0 + 25): x0 counted over all patches


def test_label_dropout_and_null_label_on_the_clean_group():
    m = Oracle(X0, lambda head, masked: torch.ones_like(masked), num_classes=10)
    y = torch.arange(8) % 10
    run(m, X0, y=y, label_dropout=0.5, r_t0=0.25)
    clean, noisy = m.calls
    assert clean["y"] is None  # the noise-free step is unconditional (official code)
    kept = noisy["y"] != 10
    assert torch.equal(noisy["y"][kept], y[:6][kept]) and 0 < kept.sum() < 6


def test_patchify_round_trip():
    x = torch.randn(2, 3, 32, 32)
    for p in (1, 2, 4, 8):
        patches = patchify(x, p)
        assert patches.shape == (2, (32 // p) ** 2, p * p * 3)
        torch.testing.assert_close(unpatchify(patches, p, 3), x, rtol=0, atol=0)
    # patch k is the k-th p x p block in row-major order
    assert torch.equal(patchify(x, 8)[:, 5].view(2, 8, 8, 3).permute(0, 3, 1, 2), x[:, :, 8:16, 8:16])


def test_n0_overrides_the_split():
    m = Oracle(X0, lambda head, masked: torch.ones_like(masked))
    run(m, X0, r_t0=0.5, n0=3)  # a DDP rank's share of the global batch's noise-free images
    assert m.calls[0]["x"].shape[0] == 3 and torch.equal(m.calls[0]["x"], X0[5:])
