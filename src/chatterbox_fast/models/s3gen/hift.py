"""HiFT vocoder (NSF + iSTFTNet): 80-bin log-mel at 50 Hz -> 24 kHz waveform (spec §3.7, §10.13).

Weight-compatible with the `mel2wav.*` keys of `s3gen.safetensors`: module names mirror the checkpoint keys once the
weight-norm pairs (`<m>.parametrizations.weight.original0/1`) are folded into plain `<m>.weight` at load time:

    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig())
    load_strict(hift, state, HIFT_KEYMAP, transform=fold_weight_norm, name="s3gen.safetensors")
    hift.init_buffers()  # the STFT window is a non-persistent buffer: recompute it after a meta-device build

The vocoder is stochastic (random harmonic phases and noise in the source). Every random tensor is an explicit
argument, so a call is a pure function of (mel, phases, noise); `draw_source_noise` draws them in the reference's
RNG order, so a seeded run reproduces the reference's global-RNG stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast.constants import S3GEN_SR
from chatterbox_fast.weights import CheckpointError, KeyMap


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int = 80  # mel bins
    base_channels: int = 512  # channels after conv_pre; halved at each upsampling stage
    nb_harmonics: int = 8  # harmonics above f0: the source has nb_harmonics + 1 = 9 sines
    sampling_rate: int = S3GEN_SR  # output rate; also the rate of the sine source
    nsf_alpha: float = 0.1  # sine amplitude (and 3x the noise std in unvoiced regions)
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz; voiced iff f0 > threshold (strict)
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16  # iSTFT head: n_fft = win_length, periodic Hann window
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)  # same dilations for every (source) resblock
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    lrelu_slope: float = 0.1  # in-loop LeakyReLU; the final one uses torch's default 0.01 (sic)
    audio_limit: float = 0.99  # output clamp
    f0_channels: int = 512  # F0 predictor width (5 conv + ELU layers)
    f0_layers: int = 5

    @property
    def num_harmonics(self) -> int:
        """Sines in the source (fundamental included)."""
        return self.nb_harmonics + 1

    @property
    def upsample_factor(self) -> int:
        """Waveform samples per mel frame: prod(upsample_rates) * hop_len = 480."""
        return math.prod(self.upsample_rates) * self.hop_len

    @property
    def n_bins(self) -> int:
        """One-sided STFT bins: n_fft // 2 + 1 = 9."""
        return self.n_fft // 2 + 1


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), per-channel alpha in linear scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        if _snake_kernel(x):  # one pass (the same operations, our vectorised sin: ~1 ulp from ATen's)
            return torch.ops.chatterbox_fast.snake(x, self.alpha)
        alpha = self.alpha[None, :, None]
        # same ops as the reference (a + b and a * b commute exactly), so results are bit-identical on the same device
        if torch.is_grad_enabled():
            return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)
        return (x * alpha).sin_().pow_(2).mul_(1.0 / (alpha + 1e-9)).add_(x)  # one (B, C, T) buffer, not four


def _snake_kernel(x: torch.Tensor) -> bool:
    """Snake through `chatterbox_fast::snake`: fp32 on a CPU at inference, contiguous or channels-last memory (what
    the convolutions here produce), kernels built. ATen's version makes four passes over x (mul, sin, pow, mul + add
    with a temporary), ~20 % of the vocoder's time on a 2-core CPU."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or x.dim() != 3:
        return False
    if not cpu_kernels.elementwise_ready():
        return False
    b, c, t = x.shape
    return x.is_contiguous() or x.stride() == (c * t, 1, c)


def _channels_last(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for (B, C, T) x; on a CPU at inference, run as a 2-D convolution over channels-last (B, T, C) memory,
    which oneDNN computes 1.4-1.7x faster for the vocoder's shapes (64-512 channels, 4k-60k samples) than the
    (B, C, T) layout. The output stays channels-last in memory (still a (B, C, T) tensor, so the next convolution
    needs no copy) and differs from conv(x) by float summation order only."""
    if not _channels_last(x) or conv.groups != 1 or conv.padding_mode != "zeros":
        return conv(x)
    x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # a no-op when x is channels-last already
    w4 = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (O, I, 1, k), <= 1.8 MB
    y = F.conv2d(x4, w4, conv.bias, stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                 dilation=(1, conv.dilation[0]))
    return y.squeeze(2)


def _conv_transpose1d(conv: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), channels-last on a CPU at inference, as `_conv1d`."""
    if not _channels_last(x) or conv.groups != 1:
        return conv(x)
    x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    w4 = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (I, O, 1, k)
    y = F.conv_transpose2d(x4, w4, conv.bias, stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                           output_padding=(0, conv.output_padding[0]), dilation=(1, conv.dilation[0]))
    return y.squeeze(2)


class ResBlock(nn.Module):
    """Snake residual block: for each dilation d, x += conv2(snake2(conv1_d(snake1(x)))); 'same' padding."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = _conv1d(conv2, act2(_conv1d(conv1, act1(x)))).add_(x)  # conv2's output is fresh: add in place
        return x


class F0Predictor(nn.Module):
    """Mel -> f0 in Hz: 5 x (Conv1d k3 + ELU), Linear(C -> 1), abs. Keys `f0_predictor.condnet.{0,2,4,6,8}`."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(cfg.f0_layers):
            c_in = cfg.in_channels if i == 0 else cfg.f0_channels
            layers += [nn.Conv1d(c_in, cfg.f0_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.f0_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (B, 80, T) -> (B, T)
        h = self.condnet(mel).transpose(1, 2)  # (B, T, C)
        return torch.abs(self.classifier(h).squeeze(-1))


def harmonic_source(f0: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor, cfg: HiFTConfig) -> torch.Tensor:
    """SineGen: sample-rate f0 (B, 1, L) Hz, phases (B, H, 1), standard-normal noise (B, H, L) -> (B, H, L).

    Harmonic h (1-based) has phase 2*pi*(cumsum(h*f0/sr) mod 1) + phases[:, h-1]; sines have amplitude nsf_alpha
    and are kept only where f0 > threshold; noise std is nsf_sigma (voiced) or nsf_alpha/3 (unvoiced).
    Always fp32 (as in the reference): an fp16 cumsum over L samples would lose the phase.
    """
    f0 = f0.float()
    harm = torch.arange(1, cfg.num_harmonics + 1, device=f0.device, dtype=torch.float32).view(1, -1, 1)
    # fp32 cumsum over the whole signal, mod 1, exactly as the reference (its rounding is part of the output)
    freqs = f0 * harm / cfg.sampling_rate  # (B, H, L) cycles per sample
    theta = 2 * math.pi * (torch.cumsum(freqs, dim=-1) % 1)
    sines = cfg.nsf_alpha * torch.sin(theta + phases.float())
    uv = (f0 > cfg.nsf_voiced_threshold).float()  # (B, 1, L)
    noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
    return sines * uv + noise_amp * noise.float()


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source merged to one excitation: s = tanh(l_linear(harmonics)). Key `m_source`."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.l_linear = nn.Linear(cfg.num_harmonics, 1)

    def forward(self, harmonics: torch.Tensor) -> torch.Tensor:  # (B, H, L) -> (B, 1, L)
        h = harmonics.to(self.l_linear.weight.dtype).transpose(1, 2)  # (B, L, H)
        return torch.tanh(self.l_linear(h)).transpose(1, 2)


class HiFTGenerator(nn.Module):
    """mel (B, 80, T) -> waveform (B, 480 T) at 24 kHz, plus the source signal s (B, 1, 480 T).

    Non-persistent buffer: `stft_window` (periodic Hann(n_fft)); call `init_buffers()` after a meta-device build.
    """

    def __init__(self, cfg: HiFTConfig = HiFTConfig()):
        super().__init__()
        self.cfg = cfg
        n_stages = len(cfg.upsample_rates)
        if not (len(cfg.upsample_kernel_sizes) == len(cfg.source_resblock_kernel_sizes) == n_stages):
            raise ValueError("upsample_rates, upsample_kernel_sizes and source_resblock_kernel_sizes differ in length")
        stft_ch = cfg.n_fft + 2  # [real(9) | imag(9)]
        chans = [cfg.base_channels // 2**i for i in range(n_stages + 1)]  # 512, 256, 128, 64

        self.m_source = SourceModuleHnNSF(cfg)
        self.f0_predictor = F0Predictor(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, chans[0], 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(chans[i], chans[i + 1], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # source STFT (hop_len) -> resolution of stage i: stride = prod of the upsample rates after stage i
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, k in enumerate(cfg.source_resblock_kernel_sizes):
            stride = math.prod(cfg.upsample_rates[i + 1:])  # 15, 3, 1
            if stride == 1:
                self.source_downs.append(nn.Conv1d(stft_ch, chans[i + 1], 1))
            else:
                self.source_downs.append(nn.Conv1d(stft_ch, chans[i + 1], 2 * stride, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(chans[i + 1], k, cfg.resblock_dilations))
        self.resblocks = nn.ModuleList(
            ResBlock(chans[i + 1], k, cfg.resblock_dilations)
            for i in range(n_stages)
            for k in cfg.resblock_kernel_sizes
        )
        self.conv_post = nn.Conv1d(chans[-1], stft_ch, 7, padding=3)
        self.register_buffer("stft_window", torch.empty(cfg.n_fft), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent STFT window on the parameters' device. No-op while on meta."""
        device = self.conv_pre.weight.device
        if device.type == "meta":
            return
        # periodic Hann computed in float64 then rounded, like scipy.signal.get_window("hann", n, fftbins=True)
        window = torch.hann_window(self.cfg.n_fft, periodic=True, dtype=torch.float64, device=device)
        self.stft_window = window.to(torch.float32)

    # ---- stages (pure functions of explicit tensors) ----

    def predict_f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) -> f0 (B, T) in Hz."""
        return self.f0_predictor(mel)

    def source(self, f0: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 (B, T) Hz at frame rate, phases (B, 9, 1), noise (B, 9, 480 T) -> s (B, 1, 480 T), fp32 math."""
        f0_up = f0[:, None].repeat_interleave(self.cfg.upsample_factor, dim=-1)  # nearest upsampling, (B, 1, L)
        return self.m_source(harmonic_source(f0_up, phases, noise, self.cfg))

    def decode(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T), source s (B, 1, 480 T) -> waveform (B, 480 T), clamped to +-audio_limit."""
        cfg = self.cfg
        window = self._window()
        spec = torch.stft(s.squeeze(1).float(), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=window, return_complex=True)
        spec = torch.view_as_real(spec)  # (B, 9, 120 T + 1, 2)
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1).to(mel.dtype)  # (B, 18, 120 T + 1)

        x = _conv1d(self.conv_pre, mel)  # (B, 512, T), channels-last in memory on CPU
        n_stages, n_k = len(self.ups), len(cfg.resblock_kernel_sizes)
        for i in range(n_stages):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = _conv_transpose1d(self.ups[i], x)  # (B, C_i, T * prod(rates[:i+1]))
            if i == n_stages - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # 120 T -> 120 T + 1, matching the STFT frames
            x = x + self.source_resblocks[i](_conv1d(self.source_downs[i], s_stft))
            xs = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                xs = xs.add_(self.resblocks[i * n_k + j](x))  # xs is a fresh resblock output
            x = xs.div_(n_k)
        x = F.leaky_relu(x)  # default slope 0.01 (sic)
        x = self.conv_post(x).float()  # (B, 18, 120 T + 1), back in (B, C, T) memory (a module call: hooks see it)
        magnitude = torch.clip(torch.exp(x[:, : cfg.n_bins]), max=1e2)
        phase = torch.sin(x[:, cfg.n_bins :])  # sin of the predicted phase (sic)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=window)  # (B, 480 T)
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)

    def forward(
        self,
        mel: torch.Tensor,
        phases: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        cache_source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (wav (B, 480 T), s (B, 1, 480 T)).

        Randomness: pass `phases` (B, 9, 1) (phases[:, 0] is the fundamental's, 0 in the reference) and standard-normal
        `noise` (B, 9, 480 T) together, or neither: then they are drawn by `draw_source_noise` from `generator`
        (or torch's global RNG when None, in the reference's order). `cache_source` (B, 1, Lc), Lc <= 480 T, overwrites
        the start of the source (the reference's streaming hook, to keep chunk seams continuous).
        """
        batch, length = self._check_mel(mel)
        if (phases is None) != (noise is None):
            raise ValueError("pass both `phases` and `noise`, or neither")
        if phases is None:
            phases, noise = draw_source_noise(
                batch, length, num_harmonics=self.cfg.num_harmonics, generator=generator, device=mel.device
            )
        else:
            self._check_noise(phases, noise, batch, length)
        if cache_source is not None:
            self._check_cache(cache_source, batch, length)
        f0 = self.predict_f0(mel)
        s = self.source(f0, phases, noise)
        if cache_source is not None and cache_source.shape[-1] > 0:
            s = s.clone()
            s[:, :, : cache_source.shape[-1]] = cache_source
        return self.decode(mel, s), s

    # ---- helpers ----

    def _window(self) -> torch.Tensor:
        if self.stft_window.is_meta:
            raise RuntimeError("HiFTGenerator.stft_window is on the meta device: call init_buffers() after loading")
        return self.stft_window.float()

    def _check_mel(self, mel: torch.Tensor) -> tuple[int, int]:
        if not isinstance(mel, torch.Tensor):
            raise TypeError(f"mel must be a torch.Tensor, got {type(mel).__name__}")
        if not mel.is_floating_point():
            raise TypeError(f"mel must be a floating-point tensor, got {mel.dtype}")
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels or mel.shape[2] < 1:
            raise ValueError(f"mel must be (B, {self.cfg.in_channels}, T) with T >= 1, got {tuple(mel.shape)}")
        return mel.shape[0], mel.shape[2] * self.cfg.upsample_factor

    def _check_noise(self, phases: torch.Tensor, noise: torch.Tensor, batch: int, length: int) -> None:
        h = self.cfg.num_harmonics
        for name, t, shape in (("phases", phases, (batch, h, 1)), ("noise", noise, (batch, h, length))):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point torch.Tensor")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")

    @staticmethod
    def _check_cache(cache_source: torch.Tensor, batch: int, length: int) -> None:
        if not isinstance(cache_source, torch.Tensor) or not cache_source.is_floating_point():
            raise TypeError("cache_source must be a floating-point torch.Tensor")
        shape = tuple(cache_source.shape)
        if len(shape) != 3 or shape[1] != 1 or shape[0] not in (1, batch) or shape[2] > length:
            raise ValueError(f"cache_source must be (B or 1, 1, Lc) with Lc <= {length}, got {shape}")


def draw_source_noise(
    batch: int,
    length: int,
    *,
    num_harmonics: int = 9,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    consume_unused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source inputs in the reference's RNG order -> phases (B, H, 1), noise (B, H, L), fp32 on `device`.

    Per reference call: torch.rand (B, H, 1) -> phases = -pi + u * 2pi (torch's Uniform(-pi, pi)) with the
    fundamental's phase then set to 0; torch.randn (B, H, L) standard-normal noise; one more randn (B, L, 1) that
    the reference never uses (drawn here too when `consume_unused`, so the stream stays aligned).

    generator=None: torch's global RNGs, exactly as the reference: the phases from the *CPU* RNG (its Uniform has CPU
    bounds) and the noise from the RNG of `device`; after torch.manual_seed(s) this replays a seeded reference call.
    generator given: every draw comes from it, on its device, in the same order (then moved to `device`); a CPU
    generator seeded with s gives the same tensors as the CPU reference after torch.manual_seed(s).
    """
    if batch < 1 or length < 1 or num_harmonics < 1:
        raise ValueError(f"batch, length and num_harmonics must be >= 1, got {batch}, {length}, {num_harmonics}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    phase_dev = generator.device if generator is not None else torch.device("cpu")
    noise_dev = generator.device if generator is not None else device
    low = torch.tensor(-math.pi, dtype=torch.float32, device=phase_dev)
    high = torch.tensor(math.pi, dtype=torch.float32, device=phase_dev)
    u = torch.rand((batch, num_harmonics, 1), generator=generator, device=phase_dev)
    phases = low + u * (high - low)
    phases[:, 0] = 0
    noise = torch.randn((batch, num_harmonics, length), generator=generator, device=noise_dev)
    if consume_unused:
        torch.randn((batch, length, 1), generator=generator, device=noise_dev)
    return phases.to(device), noise.to(device)


# ---- checkpoint ----

_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"

HIFT_KEYMAP = KeyMap(prefix="mel2wav.")
"""Keys of s3gen.safetensors owned by the vocoder; use with transform=fold_weight_norm."""


def _wn_base(key: str, suffix: str) -> str | None:
    """'<m>.' (or '' for a top-level pair) if key is '<m>.<suffix>', else None."""
    if key == suffix:
        return ""
    return key[: -len(suffix)] if key.endswith("." + suffix) else None


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight-norm pair `<m>.parametrizations.weight.original0` (g) / `.original1` (v) by `<m>.weight`.

    weight = g * v / ||v||, the norm over every dim but 0 (for ConvTranspose1d dim 0 is the *input* channel).
    Uses torch's own weight-norm kernel, so the folded weight is bit-identical to the one the reference's
    parametrization recomputes at every call. Low-precision pairs are folded in fp32 (and returned in fp32).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if (base := _wn_base(key, _G)) is not None:
            if base + _V not in state:
                raise CheckpointError(f"weight-norm pair incomplete: {key!r} has no {base + _V!r}")
            if base + "weight" in state:
                raise CheckpointError(f"{base}weight: both a weight-norm pair and a plain weight")
            g, v = value, state[base + _V]
            if g.dim() != v.dim() or g.shape[0] != v.shape[0] or g[0].numel() != 1:
                raise CheckpointError(f"{base}: g {tuple(g.shape)} does not match v {tuple(v.shape)} (norm over dim 0)")
            if v.dtype not in (torch.float32, torch.float64):
                g, v = g.float(), v.float()
            out[base + "weight"] = torch._weight_norm(v, g, 0)
        elif (base := _wn_base(key, _V)) is not None:
            if base + _G not in state:
                raise CheckpointError(f"weight-norm pair incomplete: {key!r} has no g ({base + _G!r})")
        else:
            out[key] = value
    return out


def trim_fade_window(sample_rate: int = S3GEN_SR, device: torch.device | str | None = None) -> torch.Tensor:
    """(2 n,) with n = sr / 50 (20 ms): n zeros, then a raised-cosine fade-in over n samples (reference, fp32)."""
    n = sample_rate // 50
    window = torch.zeros(2 * n, device=device)
    window[n:] = (torch.cos(torch.linspace(torch.pi, 0, n, device=device)) + 1) / 2
    return window


def trim_fade(wav: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the first 20 ms of wav (..., L) and fade in the next 20 ms (hides spill-over from the prompt).

    Out of place. Unlike the reference (which raises), a wav shorter than the window gets the window's start.
    """
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
        raise TypeError("wav must be a floating-point torch.Tensor")
    if wav.dim() < 1:
        raise ValueError("wav must have a time axis")
    if window is None:
        window = trim_fade_window(device=wav.device)
    n = min(window.shape[-1], wav.shape[-1])
    out = wav.clone()
    out[..., :n] *= window[:n].to(wav.dtype)
    return out
