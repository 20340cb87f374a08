"""The estimator's inference layout (`ConditionalDecoder.inference_layout_`): tap-major causal convs and one fused
q/k/v GEMM per attention. Same values and keys as the checkpoint layout, so the outputs must agree to the last few
ulps (the GEMMs may block differently); parity against the reference with this layout is in test_flow.py."""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast.models.s3gen.estimator import Attention, CausalConv1d, ConditionalDecoder, EstimatorConfig


def _tiny(head_dim: int = 64, seed: int = 0) -> ConditionalDecoder:
    cfg = EstimatorConfig(channels=64, n_blocks=1, num_mid_blocks=2, num_heads=2, head_dim=head_dim,
                          time_embed_dim=64)
    torch.manual_seed(seed)
    est = ConditionalDecoder(cfg)
    with torch.no_grad():
        for p in est.parameters():
            p.normal_(0, 0.2)
    return est.eval()


def _inputs(est: ConditionalDecoder, t: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, t, est.cfg.in_channels, generator=g)
    return h, est.embed_time(torch.rand(2, generator=g))


def _fused(est: ConditionalDecoder) -> list[bool]:
    return [m._fused_qkv_weight() is not None for m in est.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("head_dim", [16, 64])  # 64: our CPU attention kernel's head size (when built)
def test_layout_keeps_values_keys_and_outputs(head_dim):
    cpu_kernels.load()
    ref, est = _tiny(head_dim), _tiny(head_dim)
    before = {k: v.clone() for k, v in est.state_dict().items()}
    old = est.inference_layout_()
    # 3 causal k=3 convs per resnet (2 blocks) + down/up convs + final block: each replaced once; 3 per attention
    n_conv = sum(1 for m in est.modules() if isinstance(m, CausalConv1d) and m.kernel_size > 1)
    n_attn = sum(1 for m in est.modules() if isinstance(m, Attention))
    assert len(old) == n_conv + 3 * n_attn and n_conv > 0 and n_attn > 0
    after = est.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for m in est.modules():
        if isinstance(m, CausalConv1d) and m.kernel_size > 1:
            assert all(m.weight[:, :, j].is_contiguous() for j in range(m.kernel_size))
    assert all(_fused(est))
    assert est.inference_layout_() == []  # idempotent
    h, t_emb = _inputs(est)
    with torch.inference_mode():
        y, y_ref = est.forward_packed(h, t_emb), ref.forward_packed(h, t_emb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # the fused GEMM is really what runs: corrupt the fused tensor's k rows through to_k and the output moves
    with torch.no_grad():
        attn = next(m for m in est.modules() if isinstance(m, Attention))
        attn.to_k.weight.mul_(2.0)
        assert torch.equal(attn.qkv_weight[attn.heads * attn.head_dim:2 * attn.heads * attn.head_dim],
                           attn.to_k.weight)
    with torch.inference_mode():
        assert (est.forward_packed(h, t_emb) - y_ref).abs().max() > 1e-3


def test_load_state_dict_after_layout_updates_the_fused_weights():
    est, other = _tiny(seed=0), _tiny(seed=5)
    est.inference_layout_()
    est.load_state_dict(other.state_dict())  # copies into the views: the fused tensor follows
    assert all(_fused(est))
    h, t_emb = _inputs(est)
    with torch.inference_mode():
        torch.testing.assert_close(est.forward_packed(h, t_emb), other.forward_packed(h, t_emb), rtol=1e-5, atol=1e-5)


def test_grad_mode_and_moved_modules_use_the_separate_projections():
    ref, est = _tiny(), _tiny()
    est.inference_layout_()
    h, t_emb = _inputs(est)
    with torch.enable_grad():  # autograd: the parameters themselves (gradients reach to_q/k/v)
        y = est.forward_packed(h, t_emb)
        y.square().mean().backward()
    attn = next(m for m in est.modules() if isinstance(m, Attention))
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0
    # another dtype gives the parameters new storage: the stale fused tensor must not be used
    est64, ref64 = est.double(), ref.double()
    assert not any(_fused(est64))
    with torch.inference_mode():
        torch.testing.assert_close(est64.forward_packed(h.double(), t_emb.double()),
                                   ref64.forward_packed(h.double(), t_emb.double()), rtol=1e-9, atol=1e-9)
