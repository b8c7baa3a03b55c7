"""ViT: the token-dropping path MAE uses agrees with the default path and sees only kept patches."""

from __future__ import annotations

import torch

from bigmodel.architectures.vit import ViT


def _vit() -> ViT:
    torch.manual_seed(0)
    return ViT(size="nano", image_size=16, patch_size=4, in_chans=1).eval()


def test_forward_visible_with_every_patch_is_the_default_path() -> None:
    net = _vit()
    x = torch.randn(3, 1, 16, 16)
    all_ids = torch.arange(net.num_patches).expand(3, -1)
    torch.testing.assert_close(net.forward_visible(x, all_ids), net.forward_features(x))


def test_forward_visible_encodes_exactly_the_kept_patches() -> None:
    """K tokens per sample (+ class token), each with its own position embedding; the pixels of
    dropped patches have no influence."""
    net = _vit()
    x = torch.randn(2, 1, 16, 16)
    ids = torch.stack([torch.randperm(net.num_patches)[:5] for _ in range(2)])
    out = net.forward_visible(x, ids)
    assert out.shape == (2, 1 + 5, net.feature_dim)
    # blank every dropped patch: same output
    keep = torch.zeros(2, net.num_patches, dtype=torch.bool).scatter_(1, ids, True)
    pixel_keep = keep.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 4, 4, 4).reshape(2, 1, 16, 16)
    torch.testing.assert_close(net.forward_visible(torch.where(pixel_keep, x, 0.0), ids), out)
    # a token's position comes from its patch index, not its slot: reordering ids reorders outputs
    torch.testing.assert_close(net.forward_visible(x, ids.flip(1))[:, 1:].flip(1), out[:, 1:])
    # and a different set of patches gives different tokens
    assert not torch.allclose(net.forward_visible(x, (ids + 1) % net.num_patches), out, atol=1e-4)


def test_global_pool_token_or_average() -> None:
    net = _vit()
    x = torch.randn(2, 1, 16, 16)
    tokens = net.forward_features(x)
    torch.testing.assert_close(net(x), tokens[:, 0])
    net.global_pool = "avg"
    torch.testing.assert_close(net(x), tokens[:, 1:].mean(1))


def test_attention_is_timms_and_attends_in_fp32_under_cpu_bf16_autocast(monkeypatch) -> None:
    """Same parameters and outputs as timm's Attention (causal too); under CPU bf16 autocast the
    projections run in bf16 but SDPA gets fp32 queries, keys and values (its bf16 backward is slow)."""
    import torch.nn.functional as F
    from timm.layers import Attention as TimmAttention

    from bigmodel.architectures.vit import Attention

    torch.manual_seed(0)
    ours, ref = Attention(32, num_heads=4, qkv_bias=True), TimmAttention(32, num_heads=4, qkv_bias=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 32, requires_grad=True)
    for causal in (False, True):
        torch.testing.assert_close(ours(x, is_causal=causal), ref(x, is_causal=causal), rtol=0, atol=0)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x, is_causal=True)
    assert seen == [torch.float32] and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x, is_causal=True), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    net = ViT(size="nano", image_size=16, patch_size=4)
    assert all(type(b.attn) is Attention for b in net.vit.blocks)
