"""The UMD corruption and loss: where masked auto-encoding and diffusion become one objective.

Every batch is split, deterministically, into two groups that share one network:

  * the last n0 = int(B * r_t0) images take the NOISE-FREE, HIGH-MASK step (MAE):
    time input 0, no noise, mask_ratio_t0 (75%) of the patches dropped; the loss L0 is the
    pixel MSE of the x0 prediction on the masked patches.
  * the other B - n0 images take the MIXED step (masked DiT): t ~ U{0..T-1} (T = 1000), the
    whole image noised to x_t, then mask_ratio (37.5%) of its patches dropped, time input t + 1;
    the loss is Lt = 0.5 * (eps MSE on the visible patches + x0 MSE on the masked ones).

  L = (n0 / B) * L0 + (1 - n0 / B) * Lt  ~  r_t0 * L0 + (1 - r_t0) * Lt

MAE (r_t0 = 1), DiT (r_t0 = 0, no mask) and MaskDiT (r_t0 = 0, 50% masked) are settings of the
same step (config.py, METHODS). Every random draw (t, noise, masks, label dropout) comes from
one torch.Generator, so a seed fixes it, and the network only sees tensors of fixed shape.

References: UMD, arXiv 2406.17688, official code github.com/philippe-eecs/small-vision,
big_vision/trainers/train_ae.py (the step and its loss) and big_vision/gaussian_diffusion.py (the
schedule); MAE's masking, arXiv 2111.06377 (facebookresearch/mae, models_mae.py); the cosine
schedule, Nichol & Dhariwal, arXiv 2102.09672.
"""
import math

import torch
import torch.nn.functional as F

CLEAN = 0  # the time input of a clean image: the noise-free step and the probes


def time_input(t):
    """The network's time input for diffusion step t in [0, T-1]: t + 1, so that CLEAN (0) always
    means "no noise at all" and never collides with t = 0, which is already (slightly) noised."""
    return t + 1


def cosine_alphas_cumprod(T=1000, max_beta=0.999):
    """abar[t] for t = 0..T-1 of the cosine schedule (betas clipped at max_beta), float64."""
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - f(t + 1) / f(t), max_beta) for t in range(T)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)


def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps, per image; t: LongTensor[B] in [0, T-1]."""
    abar = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise


def random_masking(batch_size, num_patches, mask_ratio, device=None, generator=None):
    """MAE's masking: a random permutation per image keeps its first n_keep patches, the same
    number in every row (static shapes). Returns ids_keep [B, n_keep], mask [B, L] (1 = dropped,
    in patch order) and ids_restore [B, L], which undoes the shuffle in the decoder."""
    n_keep = int(num_patches * (1 - mask_ratio))
    scores = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = scores.argsort(dim=1)       # ascending scores: the first n_keep are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # where patch i sits in the shuffled order
    mask = (ids_restore >= n_keep).float()    # so patch i is dropped when it sits past n_keep
    return ids_shuffle[:, :n_keep], mask, ids_restore


def patch_mse(pred, target, patch_size):
    """Mean squared error of each patch, [B, C, H, W] x 2 -> [B, L], in row-major patch order."""
    se = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)
    return F.avg_pool2d(se, patch_size).flatten(1)


def masked_mean(per_patch, weight):
    """Mean over the patches where weight = 1 (all patches have the same pixel count)."""
    return (per_patch * weight).sum() / weight.sum()


def umd_loss(model, x0, *, r_t0, mask_ratio, mask_ratio_t0, alphas_cumprod,
             y=None, label_dropout=0.0, generator=None, n0=None):
    """One UMD step on images x0 in [-1, 1] -> (loss, stats). stats holds loss_t0 and loss_t, as
    detached 0-dim tensors (a float() per step would make the GPU wait). n0 overrides
    int(B * r_t0): a DDP rank takes its share of the global batch's noise-free images."""
    B, C = x0.shape[:2]
    L, p, dev = model.num_patches, model.patch_size, x0.device
    n0 = int(B * r_t0) if n0 is None else n0  # the last n0 images: noise-free; the rest: mixed
    loss, stats = x0.new_zeros((), dtype=torch.float32), {}

    # 1. Noise-free, high-mask step (MAE): time input CLEAN, predict the masked patches' pixels.
    #    No labels: in the fine-tune it is the null (unconditional) class, as officially.
    if n0 > 0:
        xc = x0[B - n0:]
        ids_keep, mask, ids_restore = random_masking(n0, L, mask_ratio_t0, dev, generator)
        out = model(xc, torch.full((n0,), CLEAN, device=dev),
                    ids_keep=ids_keep, ids_restore=ids_restore)
        loss_t0 = masked_mean(patch_mse(out[:, :C], xc, p), mask)
        loss = loss + (n0 / B) * loss_t0
        stats["loss_t0"] = loss_t0.detach()

    # 2. Mixed step (masked DiT): noise the whole image, then drop patches. The network predicts
    #    the noise where it sees x_t and the clean image where it cannot: a hidden patch's noise
    #    is independent of everything visible, only its content can be inferred.
    if n0 < B:
        xn, n = x0[:B - n0], B - n0
        t = torch.randint(0, len(alphas_cumprod), (n,), device=dev, generator=generator)
        eps = torch.randn(xn.shape, device=dev, generator=generator)
        x_t = q_sample(xn, t, eps, alphas_cumprod)
        yn = None
        if y is not None:  # classifier-free guidance: drop labels to the null class
            drop = torch.rand(n, device=dev, generator=generator) < label_dropout
            yn = torch.where(drop, model.num_classes, y[:n])
        if mask_ratio > 0:
            ids_keep, mask, ids_restore = random_masking(n, L, mask_ratio, dev, generator)
            out = model(x_t, time_input(t), yn, ids_keep=ids_keep, ids_restore=ids_restore)
            eps_term = masked_mean(patch_mse(out[:, C:], eps, p), 1 - mask)  # visible patches
            x0_term = masked_mean(patch_mse(out[:, :C], xn, p), mask)        # masked patches
        else:  # nothing masked (DiT, every fine-tune): both heads learn on every patch
            out = model(x_t, time_input(t), yn)
            eps_term = patch_mse(out[:, C:], eps, p).mean()
            x0_term = patch_mse(out[:, :C], xn, p).mean()
        loss_t = 0.5 * (eps_term + x0_term)
        loss = loss + (n / B) * loss_t
        stats["loss_t"] = loss_t.detach()
    return loss, stats
