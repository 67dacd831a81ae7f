"""HLIP's vision tower: a ViT whose blocks attend within slice, scan or study windows.

A study is a batch element holding up to ``N`` scans ``[N, 1, D, H, W]``. One Conv3d cuts each scan
into ``gd x gh x gw`` patches. Patch tokens are kept in study order ``[B, N, gd, gh*gw, C]`` so that
every window is a contiguous run of tokens:

* ``slice``: one depth slab (``gh*gw`` tokens) of one scan -> ``B*N*gd`` windows,
* ``scan``: one whole scan (``gd*gh*gw`` tokens) -> ``B*N`` windows,
* ``study``: every token of every scan -> ``B`` windows.

Each window carries its own copy of the CLS token. Going to a finer level *splits*: the CLS token is
copied into every sub-window. Going to a coarser level *merges*: windows are concatenated and the
CLS copies averaged (over real scans only). Regrouping adds no parameters, so the same weights run
any layout, including ``full`` attention (every block study-wide, the naive 3D-CLIP baseline).

Studies with fewer scans than the batch maximum are zero-padded; ``scan_mask`` marks real scans.
Padded tokens are excluded as keys in study-level attention and from CLS averaging, and scan and
slice blocks skip the padded scans' windows, so a study's embedding does not depend on what it is
batched with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hlip_fed.config import VisionConfig
from hlip_fed.model.pos_embed import resample_3d, scan_slots, sincos_1d, sincos_3d


def windows_per_study(level: str, n_scans: int, n_slabs: int) -> int:
    return {"slice": n_scans * n_slabs, "scan": n_scans, "study": 1}[level]


# On a CPU, in bf16, windows of up to this many tokens attend as :func:`attend_by_products`; longer
# ones go through the attention kernel in fp32, which does not hold a window's tokens x tokens
# scores in memory (a paper preset's study window spans thousands of tokens).
BF16_PRODUCTS_MAX_TOKENS = 2048


def attend_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention as two matrix products and a softmax, all in ``q``'s dtype;
    ``attn_mask`` as :func:`F.scaled_dot_product_attention`'s boolean mask (True: attend).

    On a CPU, in bf16 (under autocast, or a tower held in bf16), a window attends faster this way
    than through the attention kernel in either precision (docs/benchmarks.md, section 9). torch's
    CPU softmax computes a bf16 input in fp32 and rounds its output once, so casting around it
    would change no more than one bf16 unit."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:  # added as 0 or -inf: one pass, and none in the backward
        hidden = attn_mask.new_zeros(attn_mask.shape, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
        scores.add_(hidden)
    return scores.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        dtype = q.dtype
        if q.device.type != "cpu" or dtype == torch.float32:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif n <= BF16_PRODUCTS_MAX_TOKENS:
            x = attend_by_products(q, k, v, attn_mask)
        else:
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(dtype)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a block's residual branch per sample in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block; ``level`` says which window it attends within."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, level: str):
        super().__init__()
        self.level = level
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def cut_patches(x: torch.Tensor, patch_size, dtype: torch.dtype | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """The voxels of each whole patch of ``x`` ``[..., D, H, W]`` in the tower's token order:
    ``[..., gd, gh*gw, pd*ph*pw]`` (voxels beyond a whole patch are dropped, as a Conv3d drops them),
    in ``dtype`` (default: ``x``'s), cast and cut in one copy. With ``rows``, only those volumes of
    ``x`` (indices into its volumes in order) are cut: ``[len(rows), gd, gh*gw, pd*ph*pw]``."""
    (pd, ph, pw), (d, h, w) = patch_size, x.shape[-3:]
    gd, gh, gw = d // pd, h // ph, w // pw
    blocks = x[..., : gd * pd, : gh * ph, : gw * pw].reshape(-1, gd, pd, gh, ph, gw, pw)
    blocks = blocks.permute(0, 1, 3, 5, 2, 4, 6)
    if rows is None:
        patches = torch.empty(blocks.shape, dtype=dtype or x.dtype, device=x.device).copy_(blocks)
        return patches.reshape(*x.shape[:-3], gd, gh * gw, pd * ph * pw)
    patches = torch.empty(len(rows), *blocks.shape[1:], dtype=dtype or x.dtype, device=x.device)
    for i, row in enumerate(rows.tolist()):  # no gathered copy of the volumes first
        patches[i].copy_(blocks[row])
    return patches.reshape(len(rows), gd, gh * gw, pd * ph * pw)


class PatchEmbed3D(nn.Module):
    """HLIP's patch embedding, a Conv3d with stride = kernel over every scan:
    ``[B, N, 1, D, H, W] -> [B, N, gd, gh*gw, C]``.

    The weights are the Conv3d's (``proj``); the forward cuts the scans into patches and applies
    them as one linear layer, which is the same function (voxels beyond a whole patch are dropped,
    as the convolution drops them) and is faster than CPU 3D convolution, in bf16 above all. Given
    the scan mask it cuts and embeds the real scans only; a padded scan's tokens are zero, which no
    real output reads (the tower hides them).
    """

    def __init__(self, patch_size: tuple[int, int, int], dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(1, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def patches(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, 1, D, H, W] -> [B, N, gd, gh*gw, P]`` (with ``rows``, the scans
        ``x.flatten(0, 1)[rows]``: ``[R, gd, gh*gw, P]``): each patch's voxels in the weights'
        dtype, channel axis dropped."""
        return cut_patches(x[:, :, 0], self.patch_size, self.proj.weight.dtype, rows)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """The Conv3d's weights applied to :meth:`patches`' output as one linear layer."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def tokens(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """:meth:`patches`' scans embedded: ``[B, N, gd, gh*gw, C]`` or ``[R, gd, gh*gw, C]``."""
        return self.embed(self.patches(x, rows))

    def forward(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        if scan_mask is None or bool(scan_mask.all()):
            return self.tokens(x, None)
        rows = scan_mask.reshape(-1).nonzero().squeeze(1)
        real = self.tokens(x, rows)
        tokens = real.new_zeros(scan_mask.numel(), *real.shape[1:]).index_copy(0, rows, real)
        return tokens.unflatten(0, scan_mask.shape)


# The quantiles of each patch's voxels that :class:`QuantilePatchEmbed3D` reads.
PATCH_QUANTILES = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0])


class QuantilePatchEmbed3D(PatchEmbed3D):
    """:class:`PatchEmbed3D` plus a linear map of each patch's intensity quantiles
    (:data:`PATCH_QUANTILES`, nearest rank) added to its token. The map starts at zero, so the
    embedding starts as HLIP's. A patch's quantiles do not change when its voxels move within it:
    a small bright or dark lesion anywhere in a patch several cm across shifts its upper or lower
    quantiles."""

    def __init__(self, patch_size: tuple[int, int, int], dim: int):
        super().__init__(patch_size, dim)
        self.quantile_proj = nn.Linear(len(PATCH_QUANTILES), dim)
        self.reset_added_map()

    def reset_added_map(self) -> None:
        """Zero the map added to HLIP's embedding, so that the stem starts as HLIP's."""
        nn.init.zeros_(self.quantile_proj.weight)
        nn.init.zeros_(self.quantile_proj.bias)

    @staticmethod
    def quantiles(patches: torch.Tensor) -> torch.Tensor:
        """:meth:`patches`' output ``[..., P] -> [..., len(PATCH_QUANTILES)]``."""
        ranks = (PATCH_QUANTILES * (patches.shape[-1] - 1)).round().long().to(patches.device)
        return patches.sort(dim=-1).values[..., ranks]

    def tokens(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        patches = self.patches(x, rows)
        return self.embed(patches) + self.quantile_proj(self.quantiles(patches))


class MirrorPatchEmbed3D(PatchEmbed3D):
    """:class:`PatchEmbed3D` plus a linear map of each patch of the scan's left-right difference
    (the scan minus its mirror image along the last, left-right axis) added to its token. The map
    starts at zero, so the embedding starts as HLIP's. A healthy brain is nearly symmetric and focal
    disease is mostly one-sided, so the difference shows a lesion beside the tissue it replaces."""

    def __init__(self, patch_size: tuple[int, int, int], dim: int):
        super().__init__(patch_size, dim)
        self.mirror_proj = nn.Linear(math.prod(patch_size), dim)
        self.reset_added_map()

    def reset_added_map(self) -> None:
        """Zero the map added to HLIP's embedding, so that the stem starts as HLIP's."""
        nn.init.zeros_(self.mirror_proj.weight)
        nn.init.zeros_(self.mirror_proj.bias)

    def tokens(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self.embed(self.patches(x, rows)) + self.mirror_proj(self.patches(x - x.flip(-1), rows))


class ConvStem3D(nn.Module):
    """A convolutional patch embedding with :class:`PatchEmbed3D`'s interface: 3x3x3 convolutions,
    each halving the axes that still have to shrink (GroupNorm, GELU; channels doubling up to
    ``dim / 2``), then a 1x1x1 projection to ``dim``. Needs power-of-two patch sizes."""

    def __init__(self, patch_size: tuple[int, int, int], dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        steps = max(int(math.log2(p)) for p in self.patch_size)
        layers, chans, left = [], 1, list(self.patch_size)
        for i in range(steps):
            stride = tuple(2 if n > 1 else 1 for n in left)
            left = [n // s for n, s in zip(left, stride)]
            out = max(8, min(dim // 2, (dim // 2) >> (steps - 1 - i)))
            layers += [nn.Conv3d(chans, out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(math.gcd(8, out), out),
                       nn.GELU()]
            chans = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv3d(chans, dim, 1)

    def forward(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every scan, the padded ones too (``scan_mask`` is :class:`PatchEmbed3D`'s interface)."""
        b, n = x.shape[:2]
        x = x.flatten(0, 1).to(self.proj.weight.dtype)
        x = self.proj(self.convs(x))  # [B*N, C, gd, gh, gw]
        c, gd, gh, gw = x.shape[1:]
        return x.permute(0, 2, 3, 4, 1).reshape(b, n, gd, gh * gw, c)


class HLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_size))
        levels = cfg.attention.levels if cfg.attention.mode == "hierarchical" else ["study"] * cfg.depth
        self.levels = list(levels)
        stem = {"patch": PatchEmbed3D, "conv": ConvStem3D, "patch_quantiles": QuantilePatchEmbed3D,
                "patch_mirror": MirrorPatchEmbed3D}[cfg.stem]
        self.patch_embed = stem(tuple(cfg.patch_size), cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        # Frozen position embeddings: derived from the config (not in the state dict), or stored
        # in it (``pos_embed: stored``, imported weights), starting from the same sin-cos values.
        stored = cfg.pos_embed == "stored"
        self.register_buffer("pos_spatial", sincos_3d(cfg.width, self.grid), persistent=stored)
        self.register_buffer("pos_scan", sincos_1d(cfg.width, torch.arange(cfg.max_scans)), persistent=stored)
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], self.levels[i])
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.patch_dropout = cfg.patch_dropout
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # a conv stem's convolutions keep torch's init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)
        if isinstance(self.patch_embed, (QuantilePatchEmbed3D, MirrorPatchEmbed3D)):
            self.patch_embed.reset_added_map()  # after the trunc-normal init of every Linear above

    # --- token regrouping -------------------------------------------------------------------
    def _to_windows(self, tokens: torch.Tensor, cls: torch.Tensor, level: str) -> torch.Tensor:
        """``tokens [B, N, S, T, C]`` + per-window ``cls [B*w, 1, C]`` -> ``[B*w, 1 + L_w, C]``."""
        b, n, s, t, c = tokens.shape
        w = windows_per_study(level, n, s)
        return torch.cat([cls, tokens.reshape(b * w, -1, c)], dim=1)

    def _regroup_cls(
        self, cls: torch.Tensor, b: int, src: str, dst: str, n: int, s: int, weights: torch.Tensor
    ) -> torch.Tensor:
        """Move CLS copies from ``src`` windows to ``dst`` windows: copy on split, mean on merge."""
        w_src, w_dst = windows_per_study(src, n, s), windows_per_study(dst, n, s)
        cls = cls.reshape(b, w_src, -1)
        if w_dst > w_src:  # split: every sub-window gets the parent's CLS
            cls = cls.repeat_interleave(w_dst // w_src, dim=1)
        elif w_dst < w_src:  # merge: average the CLS copies of real windows
            k = w_src // w_dst
            wt = weights.repeat_interleave(s, dim=1) if src == "slice" else weights  # [B, w_src]
            wt = wt.reshape(b, w_dst, k, 1).to(cls.dtype)
            cls = (cls.reshape(b, w_dst, k, -1) * wt).sum(2) / wt.sum(2).clamp_min(1e-6)
        return cls.reshape(b * w_dst, 1, -1)

    @staticmethod
    def _real_windows(x: torch.Tensor, scan_mask: torch.Tensor, level: str, s: int,
                      padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scan or slice windows of real scans only, and their rows in ``x`` (None: all rows).

        A padded scan's windows never reach a real output (hidden as keys at study level, left out
        of the CLS mean and of pooling), so scan and slice blocks skip them."""
        if level == "study" or not padded:
            return x, None
        real = scan_mask if level == "scan" else scan_mask.repeat_interleave(s, dim=1)
        rows = real.reshape(-1).nonzero().squeeze(1)
        return x[rows], rows

    @staticmethod
    def _all_windows(x: torch.Tensor, rows: torch.Tensor | None, total: int) -> torch.Tensor:
        """Back to every window of the level, the padded scans' windows zero."""
        return x if rows is None else x.new_zeros(total, *x.shape[1:]).index_copy(0, rows, x)

    # --- forward ----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, scan_mask: torch.Tensor, hidden: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with position embeddings, ``[B, N, S, T, C]``; where ``hidden [B, N, S, T]``
        is True, the patch's embedding is ``mask_token`` instead (masked image modelling)."""
        x = self.patch_embed(images, scan_mask)
        if hidden is not None:
            x = torch.where(hidden[..., None], mask_token.to(x.dtype), x)
        b, n, s, t, c = x.shape
        grid = tuple(g // p for g, p in zip(images.shape[-3:], self.patch_embed.patch_size))
        spatial = resample_3d(self.pos_spatial, grid).reshape(s, t, c)
        slots = scan_slots(self.pos_scan, scan_mask.sum(1), n, self.training).to(x.dtype)
        return x + spatial.to(x.dtype) + slots[:, :, None, None, :]

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch dropout: keep a random subset of tokens in each window (training only).

        The subset is drawn per depth slab when the layout has slice-level blocks and per scan
        otherwise, so every window of every level keeps the same token count and the regrouping
        reshapes stay valid. Kept tokens stay in their original order.
        """
        if not self.training or self.patch_dropout == 0.0:
            return x
        b, n, s, t, c = x.shape
        if "slice" not in self.levels:
            x, s, t = x.reshape(b, n, 1, s * t, c), 1, s * t
        keep = max(1, int(round(t * (1.0 - self.patch_dropout))))
        idx = torch.rand(b, n, s, t, device=x.device).argsort(-1)[..., :keep].sort(-1).values
        return x.gather(3, idx[..., None].expand(-1, -1, -1, -1, c))

    def forward(self, images: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``images [B, N, 1, D, H, W]``, ``scan_mask [B, N]`` (True = real scan) -> ``[B, embed_dim]``."""
        scan_mask = self.real_scans(images, scan_mask)
        cls, tokens = self.forward_tokens(images, scan_mask)
        if self.cfg.pool == "token":
            return self.proj(self.norm(cls))
        return self.proj(self.pool_tokens(self.norm(tokens), scan_mask))

    @staticmethod
    def real_scans(images: torch.Tensor, scan_mask: torch.Tensor | None) -> torch.Tensor:
        """``scan_mask``, or every scan real when it is None; refuses images of the wrong shape."""
        if images.ndim != 6 or images.shape[2] != 1:
            raise ValueError(f"expected images [B, N_scans, 1, D, H, W], got {list(images.shape)}")
        if scan_mask is None:
            return torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return scan_mask

    def forward_tokens(self, images: torch.Tensor, scan_mask: torch.Tensor, hidden: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The study's CLS token ``[B, C]`` (its copies merged) and its patch tokens ``[B, N, S*T, C]``
        after the last block, before the final norm; a padded scan's tokens are zero.

        ``hidden``/``mask_token`` replace patch embeddings (:meth:`embed`); patch dropout is then
        off, so every patch keeps its place."""
        b, n = images.shape[:2]
        tokens = self.embed(images, scan_mask, hidden, mask_token)
        if hidden is None:
            tokens = self.drop_patches(tokens)
        _, _, s, t, c = tokens.shape
        weights = scan_mask.to(tokens.dtype)
        # Keys of padded scans are hidden from study-level attention (CLS always visible).
        study_mask, padded = None, not bool(scan_mask.all())
        if padded:
            keys = scan_mask[:, :, None].expand(b, n, s * t).reshape(b, -1)
            study_mask = torch.cat([keys.new_ones(b, 1), keys], 1)[:, None, None, :]

        level = self.levels[0]
        cls = self.cls_token.expand(b, 1, c)
        cls = self._regroup_cls(cls, b, "study", level, n, s, weights)
        x, rows = self._real_windows(self._to_windows(tokens, cls, level), scan_mask, level, s, padded)
        for block in self.blocks:
            if block.level != level:
                x = self._all_windows(x, rows, b * windows_per_study(level, n, s))
                cls, tokens = x[:, :1], x[:, 1:].reshape(b, n, s, t, c)
                cls = self._regroup_cls(cls, b, level, block.level, n, s, weights)
                level = block.level
                x, rows = self._real_windows(self._to_windows(tokens, cls, level), scan_mask, level, s, padded)
            mask = study_mask if level == "study" else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self._all_windows(x, rows, b * windows_per_study(level, n, s))
        cls = self._regroup_cls(x[:, :1], b, level, "study", n, s, weights)
        return cls[:, 0], x[:, 1:].reshape(b, n, -1, c)

    def pool_tokens(self, tokens: torch.Tensor, scan_mask: torch.Tensor) -> torch.Tensor:
        """Max, mean or the average of both over the patch tokens ``[B, N, L, C]`` of the real scans
        -> ``[B, C]``."""
        real = scan_mask[:, :, None, None]
        largest = lambda: tokens.masked_fill(~real, torch.finfo(tokens.dtype).min).amax((1, 2))  # noqa: E731
        if self.cfg.pool == "max":
            return largest()
        count = (scan_mask.sum(1) * tokens.shape[2]).clamp_min(1)[:, None].to(tokens.dtype)
        mean = (tokens * real).sum((1, 2)) / count
        return mean if self.cfg.pool == "avg" else (mean + largest()) / 2

    @property
    def tokens_per_scan(self) -> int:
        return math.prod(self.grid)
