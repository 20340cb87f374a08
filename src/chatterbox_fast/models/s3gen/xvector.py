"""CAMPPlus speaker x-vector (3D-Speaker / FunASR), the S3Gen speaker encoder (spec §3.3, §10.15).

Input is the raw Kaldi fbank of a 16 kHz waveform in [-1, 1] (`audio.mel.kaldi_fbank`, (T, 80) per utterance);
`CAMPPlus.forward` subtracts the per-utterance mean over frames itself, as the reference's `extract_feature` does.
Output is the un-normalised (B, 192) x-vector (the flow L2-normalises it later).

Module names mirror the `speaker_encoder.*` keys of s3gen.safetensors, so `SPEAKER_KEYMAP` only strips the prefix
and drops the BatchNorm `num_batches_tracked` counters.

BatchNorm always uses its running statistics (`F.batch_norm(training=False)`), whatever `.train()` says: this is an
inference port. BN is not folded into the convolutions: most BNs here sit *before* a ReLU and a conv (pre-activation
dense blocks), and folding the others would change results at float rounding level for no measurable gain.

Batching: utterances of different lengths can share a batch through `lengths`. Unlike the reference (which zero-pads
the features and then lets padding leak into every convolution, the CAM context and the statistics pooling), every
time-mixing operation here is masked, so a batch gives the same x-vectors as one-by-one calls (to float rounding).
With `lengths=None` all frames are valid and the exact reference operations are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_fast.weights import KeyMap, load_strict

SPEAKER_KEYMAP = KeyMap(prefix="speaker_encoder.", drop=(r".*num_batches_tracked",))


@dataclass(frozen=True)
class CAMPPlusConfig:
    """CAMPPlus as built by S3Gen (3D-Speaker defaults, segment-level output)."""

    feat_dim: int = 80  # Kaldi fbank bins
    embedding_size: int = 192  # x-vector size
    head_channels: int = 32  # FCM 2-D conv channels; 80 bins / 8 (three freq. strides of 2) * 32 = 320 channels out
    init_channels: int = 128  # TDNN output channels
    growth_rate: int = 32  # channels added by each CAM-dense layer
    bn_size: int = 4  # bottleneck = bn_size * growth_rate = 128
    # (layers, kernel, dilation) of the three CAM-dense blocks
    blocks: tuple[tuple[int, int, int], ...] = ((12, 3, 1), (24, 3, 2), (16, 3, 2))
    seg_len: int = 100  # CAM segment-average pooling window (frames after the TDNN stride)
    bn_eps: float = 1e-5

    @property
    def min_frames(self) -> int:
        """Fewest fbank frames giving a finite x-vector: the unbiased std needs 2 frames after the TDNN stride 2."""
        return 3


# ----------------------------------------------------------------------------------------------------------------
# building blocks


class BatchNorm(nn.Module):
    """Eval-mode batch norm over dim 1 (any rank); names as torch.nn.BatchNorm{1,2}d (weight, bias, running_*)."""

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BNReLU(nn.Module):
    """The reference's `get_nonlinear("batchnorm-relu")` Sequential: key `<name>.batchnorm.*`."""

    def __init__(self, channels: int, eps: float, relu: bool = True, affine: bool = True):
        super().__init__()
        self.batchnorm = BatchNorm(channels, eps, affine)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.relu else x


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded frames (time is the last dim; mask broadcasts against x) before a time-mixing op."""
    return x if mask is None else x * mask


class BasicResBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU. Stride (s, 1): frequency only."""

    def __init__(self, in_planes: int, planes: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = BatchNorm(planes, eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm(planes, eps)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # 1x1 conv (frequency stride only) + BN
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), BatchNorm(planes, eps)
            )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # x: (B, C, F, T), mask: (B, 1, 1, T)
        out = F.relu(self.bn1(self.conv1(_masked(x, mask))))
        out = self.bn2(self.conv2(_masked(out, mask)))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """2-D conv front: (B, 80, T) -> (B, 32 * 10, T). Frequency is strided by 2 three times; time is kept."""

    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        c, eps = cfg.head_channels, cfg.bn_eps
        self.conv1 = nn.Conv2d(1, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm(c, eps)
        self.layer1 = nn.ModuleList([BasicResBlock(c, c, 2, eps), BasicResBlock(c, c, 1, eps)])
        self.layer2 = nn.ModuleList([BasicResBlock(c, c, 2, eps), BasicResBlock(c, c, 1, eps)])
        self.conv2 = nn.Conv2d(c, c, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = BatchNorm(c, eps)
        self.out_channels = c * (cfg.feat_dim // 8)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # x: (B, 80, T), mask: (B, 1, T)
        m4 = None if mask is None else mask[:, None]  # (B, 1, 1, T)
        out = F.relu(self.bn1(self.conv1(_masked(x[:, None], m4))))  # (B, 32, 80, T)
        for block in (*self.layer1, *self.layer2):
            out = block(out, m4)  # (B, 32, 40, T) then (B, 32, 20, T)
        out = F.relu(self.bn2(self.conv2(_masked(out, m4))))  # (B, 32, 10, T)
        b, c, f, t = out.shape
        return out.reshape(b, c * f, t)  # (B, 320, T)


class TDNNLayer(nn.Module):
    """Conv1d (no bias) -> BN -> ReLU; keys `linear.weight`, `nonlinear.batchnorm.*`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, eps: float):
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.nonlinear = BNReLU(cout, eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.nonlinear(self.linear(_masked(x, mask)))


class CAMLayer(nn.Module):
    """Context-aware masking: a dilated local conv gated by sigmoid(MLP(global mean + segment means))."""

    def __init__(self, bn_channels: int, out_channels: int, kernel: int, dilation: int, seg_len: int):
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel, padding=pad, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)
        self.seg_len = seg_len

    def forward(self, x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:  # x: (B, 128, T)
        y = self.linear_local(_masked(x, mask))  # (B, 32, T)
        if mask is None:
            context = x.mean(-1, keepdim=True) + self._seg_pool(x)
        else:
            xm = x * mask
            context = xm.sum(-1, keepdim=True) / lengths[:, None, None] + self._seg_pool_masked(xm, mask)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))  # (B, 32, T)
        return y * gate

    def _seg_pool(self, x: Tensor) -> Tensor:
        """Mean of each `seg_len`-frame segment (the last one partial), broadcast back over its frames."""
        seg = F.avg_pool1d(x, self.seg_len, self.seg_len, ceil_mode=True)  # (B, C, n_seg)
        return self._expand(seg, x.shape[-1])

    def _seg_pool_masked(self, xm: Tensor, mask: Tensor) -> Tensor:
        t = xm.shape[-1]
        n_seg = math.ceil(t / self.seg_len)
        pad = n_seg * self.seg_len - t
        sums = F.pad(xm, (0, pad)).unflatten(-1, (n_seg, self.seg_len)).sum(-1)  # (B, C, n_seg)
        counts = F.pad(mask, (0, pad)).unflatten(-1, (n_seg, self.seg_len)).sum(-1)  # (B, 1, n_seg)
        return self._expand(sums / counts.clamp_min(1), t)

    def _expand(self, seg: Tensor, t: int) -> Tensor:
        return seg.repeat_interleave(self.seg_len, dim=-1)[..., :t]


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU -> 1x1 conv (bottleneck) -> BN-ReLU -> CAMLayer; outputs `growth_rate` new channels."""

    def __init__(self, cin: int, cfg: CAMPPlusConfig, kernel: int, dilation: int):
        super().__init__()
        bn = cfg.bn_size * cfg.growth_rate
        self.nonlinear1 = BNReLU(cin, cfg.bn_eps)
        self.linear1 = nn.Conv1d(cin, bn, 1, bias=False)
        self.nonlinear2 = BNReLU(bn, cfg.bn_eps)
        self.cam_layer = CAMLayer(bn, cfg.growth_rate, kernel, dilation, cfg.seg_len)

    def forward(self, x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))), mask, lengths)


class CAMDenseTDNNBlock(nn.Module):
    """Dense connectivity: each layer's output is appended to the channels. Keys `tdnnd{1..n}.*`.

    The output buffer is allocated once and each layer writes its slice (the reference re-concatenates after every
    layer; the values are the same).
    """

    def __init__(self, cin: int, n_layers: int, kernel: int, dilation: int, cfg: CAMPPlusConfig):
        super().__init__()
        self.cin, self.growth = cin, cfg.growth_rate
        self.n_layers = n_layers
        for i in range(n_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(cin + i * cfg.growth_rate, cfg, kernel, dilation))

    @property
    def out_channels(self) -> int:
        return self.cin + self.n_layers * self.growth

    def forward(self, x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:  # (B, cin, T)
        b, _, t = x.shape
        out = x.new_empty(b, self.out_channels, t)
        out[:, : self.cin] = x
        c = self.cin
        for layer in self.children():
            out[:, c : c + self.growth] = layer(out[:, :c], mask, lengths)
            c += self.growth
        return out  # (B, cin + n_layers * growth, T)


class TransitLayer(nn.Module):
    """BN-ReLU -> 1x1 conv (no bias) halving the channels."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.nonlinear = BNReLU(cin, eps)
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """1x1 conv (no bias) on the pooled stats -> BatchNorm without affine parameters (no ReLU)."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)
        self.nonlinear = BNReLU(cout, eps, relu=False, affine=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C)
        return self.nonlinear(self.linear(x[..., None])[..., 0])


class XVector(nn.Module):
    """TDNN -> 3 x (CAM-dense block + transit) -> BN-ReLU -> stats pooling -> dense. Keys `xvector.*`."""

    def __init__(self, cin: int, cfg: CAMPPlusConfig):
        super().__init__()
        self.tdnn = TDNNLayer(cin, cfg.init_channels, 5, 2, cfg.bn_eps)
        c = cfg.init_channels
        for i, (n_layers, kernel, dilation) in enumerate(cfg.blocks):
            block = CAMDenseTDNNBlock(c, n_layers, kernel, dilation, cfg)
            self.add_module(f"block{i + 1}", block)
            c = block.out_channels
            self.add_module(f"transit{i + 1}", TransitLayer(c, c // 2, cfg.bn_eps))
            c //= 2
        self.n_blocks = len(cfg.blocks)
        self.out_nonlinear = BNReLU(c, cfg.bn_eps)
        self.dense = DenseLayer(2 * c, cfg.embedding_size, cfg.bn_eps)

    def forward(self, x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:  # x: (B, 320, T)
        x = self.tdnn(x, mask)  # (B, 128, T2), T2 = ceil(T / 2)
        if mask is not None:
            lengths = (lengths - 1) // 2 + 1  # conv k5 stride 2 pad 2
            mask = _time_mask(lengths, x.shape[-1], x.dtype)
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"block{i}")(x, mask, lengths)
            x = getattr(self, f"transit{i}")(x)
        x = self.out_nonlinear(x)  # (B, 512, T2)
        return self.dense(_stats_pool(x, mask, lengths))  # (B, 192)


def _time_mask(lengths: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """(B,) lengths -> (B, 1, t) mask of `dtype`, 1 on valid frames."""
    return (torch.arange(t, device=lengths.device)[None] < lengths[:, None]).to(dtype)[:, None]


def _stats_pool(x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:
    """Mean and unbiased std over time, concatenated: (B, C, T) -> (B, 2C)."""
    if mask is None:
        return torch.cat([x.mean(-1), x.std(-1, unbiased=True)], dim=-1)
    n = lengths[:, None].to(x.dtype)
    mean = (x * mask).sum(-1) / n
    var = (((x - mean[..., None]) * mask) ** 2).sum(-1) / (n - 1)
    return torch.cat([mean, var.sqrt()], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# the model


class CAMPPlus(nn.Module):
    """Speaker encoder of S3Gen: raw Kaldi fbank (B, T, 80) -> x-vector (B, 192)."""

    def __init__(self, cfg: CAMPPlusConfig = CAMPPlusConfig()):
        super().__init__()
        self.cfg = cfg
        self.head = FCM(cfg)
        self.xvector = XVector(self.head.out_channels, cfg)

    def forward(self, fbank: Tensor, lengths: Tensor | None = None) -> Tensor:
        """fbank: (B, T, 80) raw Kaldi fbank (no mean subtraction yet); lengths: (B,) valid frames, or None when
        every row is T frames long. Returns the (B, 192) x-vector (not L2-normalised)."""
        self._check(fbank, lengths)
        if lengths is None:
            x = fbank - fbank.mean(dim=1, keepdim=True)  # per-utterance mean over frames (CMN)
            mask = None
        else:
            lengths = lengths.to(device=fbank.device, dtype=torch.long)
            mask = _time_mask(lengths, fbank.shape[1], fbank.dtype)  # (B, 1, T)
            m = mask.transpose(1, 2)  # (B, T, 1)
            x = (fbank - (fbank * m).sum(1, keepdim=True) / lengths[:, None, None]) * m
        x = x.transpose(1, 2)  # (B, 80, T)
        return self.xvector(self.head(x, mask), mask, lengths)

    def _check(self, fbank: Tensor, lengths: Tensor | None) -> None:
        cfg = self.cfg
        if not isinstance(fbank, Tensor) or not fbank.is_floating_point():
            raise TypeError(f"fbank must be a floating-point tensor, got {type(fbank).__name__}"
                            + (f" of {fbank.dtype}" if isinstance(fbank, Tensor) else ""))
        if fbank.ndim != 3 or fbank.shape[-1] != cfg.feat_dim:
            raise ValueError(f"fbank must be (B, T, {cfg.feat_dim}), got {tuple(fbank.shape)}")
        if lengths is None:
            if fbank.shape[1] < cfg.min_frames:
                raise ValueError(f"need at least {cfg.min_frames} fbank frames, got {fbank.shape[1]}")
            return
        if not isinstance(lengths, Tensor) or lengths.shape != (fbank.shape[0],) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape ({fbank.shape[0]},)")
        if not torch.compiler.is_compiling():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < cfg.min_frames or hi > fbank.shape[1]:
                raise ValueError(
                    f"lengths must lie in [{cfg.min_frames}, {fbank.shape[1]}] (T of fbank), got [{lo}, {hi}]"
                )


def load_campplus(state: Mapping[str, Tensor], cfg: CAMPPlusConfig = CAMPPlusConfig()) -> CAMPPlus:
    """Build on the meta device and assign the `speaker_encoder.*` tensors of an s3gen state dict (strict)."""
    with torch.device("meta"):
        model = CAMPPlus(cfg)
    load_strict(model, state, SPEAKER_KEYMAP, name="s3gen.safetensors (speaker_encoder)")
    return model.eval()
