"""The network: a compact DiT auto-encoder.

    image -> patches (+ position) -> drop masked patches -> [4 class tokens, visible patches]
          -> encoder (adaLN-Zero blocks, conditioned on time and label) -> LayerNorm
          -> representation = mean of the class tokens
          -> decoder: visible tokens + a mask token in every dropped slot, unshuffled,
             + its own position embedding, the representation prepended as one extra token
          -> per-patch linear head -> 2C channels: [x0 prediction, eps prediction]

The encoder only ever sees class tokens + visible patches: that is where UMD saves compute.

References:
  UMD: arXiv 2406.17688; official JAX code github.com/philippe-eecs/small-vision,
      big_vision/models/ae.py (this network), big_vision/models/vit.py (its blocks)
  DiT: Peebles & Xie, arXiv 2212.09748; github.com/facebookresearch/DiT, models.py (adaLN-Zero)
  MAE: He et al., arXiv 2111.06377; github.com/facebookresearch/mae, models_mae.py (encoder on
      visible patches, decoder with mask tokens)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# width, encoder depth, decoder depth, heads: small/base/large are official; tiny is for CPUs
SIZES = {
    "tiny": (192, 6, 2, 3),
    "small": (384, 12, 4, 6),
    "base": (768, 12, 4, 12),
    "large": (1024, 24, 8, 16),
}


def patchify(x, p):
    """[B, C, H, W] -> [B, L, p*p*C], patches in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, C):
    """[B, L, p*p*C] -> [B, C, H, W], the inverse of patchify for square images."""
    B, L, _ = x.shape
    g = math.isqrt(L)  # patches per side
    x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # [B, C, row, y, column, x]
    return x.reshape(B, C, g * p, g * p)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(*qkv)  # [B, heads, N, D/heads]; flash kernels on GPUs
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: a zero-initialised linear of the condition c
    gives a shift, scale and gate per branch, so every block starts as the identity."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def mlp2(dim):  # the condition trunk: Linear(d, 2d) -> SiLU -> Linear(2d, d)
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))


class UMDModel(nn.Module):
    def __init__(self, size="small", patch_size=2, img_size=32, num_classes=None, channels=3,
                 num_cls_tokens=4):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        dim, depth, dec_depth, heads = SIZES[size]
        self.config = dict(size=size, patch_size=patch_size, img_size=img_size,
                           num_classes=num_classes, channels=channels,
                           num_cls_tokens=num_cls_tokens)
        self.patch_size, self.channels, self.num_classes = patch_size, channels, num_classes
        self.dim = dim
        self.num_patches = (img_size // patch_size) ** 2

        # the condition: sinusoidal features of the time input and an optional label, each
        # through an MLP; c = SiLU(t_emb + y_emb) feeds every adaLN linear
        self.t_mlp = mlp2(dim)
        if num_classes is not None:  # one extra row: the null label of classifier-free guidance
            self.y_embed = nn.Embedding(num_classes + 1, dim)
            self.y_mlp = mlp2(dim)

        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.cls_tokens = nn.Parameter(torch.zeros(1, num_cls_tokens, dim))
        self.encoder = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.decoder = nn.ModuleList(Block(dim, heads) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dim, eps=1e-6)
        self.final_adaLN = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, patch_size * patch_size * 2 * channels)
        initialize_weights(self)

    def condition(self, time_in, y=None):
        """c [B, d] = SiLU(t_mlp(sinusoidal(time_in)) + y_mlp(y_embed(y))), input of every adaLN."""
        # made here, not kept in a buffer: a model without buffers gives DDP nothing to sync
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=time_in.device) / (half - 1))
        args = time_in.float()[:, None] * freqs[None]  # [B, half]
        c = self.t_mlp(torch.cat([args.sin(), args.cos()], dim=-1))
        if self.num_classes is not None:  # no label given: the null label (unconditional)
            y = torch.full_like(time_in, self.num_classes) if y is None else y
            c = c + self.y_mlp(self.y_embed(y))
        return F.silu(c)

    def encode(self, x, c, ids_keep=None):
        """Visible patches -> (representation [B, d], encoded patch tokens [B, n_keep, d])."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, L, d], patches in row-major order
        x = x + self.pos_embed  # added before masking, so a kept patch knows where it was
        if ids_keep is not None:  # keep the visible patches: x[b, i] = x[b, ids_keep[b, i]]
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        n_cls = self.cls_tokens.shape[1]
        cls_tokens = self.cls_tokens.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)  # [B, n_cls + n_keep, d]
        for block in self.encoder:
            x = block(x, c)
        x = self.enc_norm(x)
        return x[:, :n_cls].mean(dim=1), x[:, n_cls:]  # [B, d], [B, n_keep, d]

    def decode(self, rep, x, c, ids_restore=None):
        """(representation [B, d], encoded visible tokens [B, n_keep, d]) -> [B, 2C, H, W]."""
        if ids_restore is not None:
            B, n_keep, D = x.shape
            mask_tokens = self.mask_token.to(x.dtype).expand(B, ids_restore.shape[1] - n_keep, D)
            x = torch.cat([x, mask_tokens], dim=1)  # [B, L, d], shuffled: kept first, then dropped
            x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # patch order
        # the representation rides along as one extra token: the decoder reads the class tokens'
        # summary, so the encoder must put what reconstruction needs into it
        x = torch.cat([rep.unsqueeze(1), x + self.dec_pos_embed], dim=1)  # [B, 1 + L, d]
        for block in self.decoder:
            x = block(x, c)
        x = self.dec_norm(x)[:, 1:]  # [B, L, d]: drop the representation token
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.head(modulate(x, shift, scale))  # [B, L, p * p * 2C]
        return unpatchify(x, self.patch_size, 2 * self.channels)  # [B, 2C, H, W]

    def forward(self, x, time_in, y=None, ids_keep=None, ids_restore=None):
        """x [B, C, H, W]; time_in: LongTensor[B], 0 for a clean image, t + 1 for diffusion step t
        (corruption.CLEAN and corruption.time_input);
        y: labels [B] or None (the null label); ids_keep/ids_restore from
        corruption.random_masking (None = no masking).
        Returns [B, 2C, H, W]: channels [:C] predict x0, [C:] predict eps."""
        c = self.condition(time_in, y)  # [B, d]
        rep, x = self.encode(x, c, ids_keep)  # [B, d], [B, n_keep, d]
        return self.decode(rep, x, c, ids_restore)

    @torch.no_grad()
    def features(self, x, time_in=None):
        """The representation [B, d]: mean of the class tokens (encoder only, no masking); the
        clean image (time input 0) unless another time input is given."""
        if time_in is None:  # time input 0: a clean image (corruption.CLEAN)
            time_in = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.encode(x, self.condition(time_in))[0]


def initialize_weights(model):
    """The official initialisation, except the patch embedding, the fused q/k/v and the condition
    MLPs, initialised as DiT does (README "Where we follow the official code ...")."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    for pos in (model.pos_embed, model.dec_pos_embed):
        nn.init.normal_(pos, std=model.num_patches ** -0.5)
    nn.init.zeros_(model.cls_tokens)
    nn.init.normal_(model.mask_token, std=0.02)
    if model.num_classes is not None:
        nn.init.normal_(model.y_embed.weight, std=model.dim ** -0.5)
    for block in [*model.encoder, *model.decoder]:
        nn.init.zeros_(block.adaLN.weight)
        nn.init.zeros_(block.adaLN.bias)
    nn.init.zeros_(model.final_adaLN.weight)
    nn.init.zeros_(model.final_adaLN.bias)
    nn.init.normal_(model.head.weight, std=0.02)


def build_model(size="small", patch_size=2, img_size=32, num_classes=None, channels=3):
    return UMDModel(size, patch_size, img_size, num_classes, channels)


def param_groups(model, weight_decay):
    """AdamW groups: no decay on biases, class tokens, mask token (small-vision no_decay_list)."""
    named = list(model.named_parameters())
    skip = lambda n: n.endswith("bias") or n in ("cls_tokens", "mask_token")
    return [dict(params=[p for n, p in named if not skip(n)], weight_decay=weight_decay),
            dict(params=[p for n, p in named if skip(n)], weight_decay=0.0)]


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint of this project."""


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict of a umd run, checked: one clear CheckpointError otherwise."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; pass the ckpt.pt of a run "
                              "(runs/<name>/ckpt.pt)")
    except Exception as e:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}); "
                              "pass the ckpt.pt of a umd run")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    if not (isinstance(model, dict) and {"size", "patch_size"} <= set(model)
            and isinstance(ckpt.get("model"), dict)):
        raise CheckpointError(f"{path} is a PyTorch file but not a umd checkpoint "
                              "(no 'model' weights and model config)")
    return ckpt


def load_checkpoint(path, device="cpu", ema=True):
    """(model in eval mode, checkpoint dict); the EMA weights when it has them, unless ema=False."""
    ckpt = read_checkpoint(path, device)
    try:
        model = UMDModel(**ckpt["config"]["model"]).to(device)
        model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not match the model its config describes "
                              f"({str(e).splitlines()[0]})")
    return model.eval(), ckpt
