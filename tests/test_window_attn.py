"""Windowed attention against a direct per-window computation with upstream's zero padding."""
import torch
from timm.layers import Attention

from vitadapter.layers.window_attn import windowed_attention


def naive_windowed(attn, x, grid, window):
    h, w = grid
    heads, dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x)[0].view(h, w, 3, heads, dim)
    hp, wp = -(-h // window) * window, -(-w // window) * window
    padded = torch.zeros(hp, wp, 3, heads, dim, dtype=x.dtype)
    padded[:h, :w] = qkv
    out = torch.zeros(hp, wp, heads, dim, dtype=x.dtype)
    for r in range(0, hp, window):
        for c in range(0, wp, window):
            tile = padded[r:r + window, c:c + window].reshape(window * window, 3, heads, dim)
            q, k, v = tile[:, 0], tile[:, 1], tile[:, 2]
            scores = torch.einsum("qhd,khd->hqk", q, k) * dim ** -0.5
            out[r:r + window, c:c + window] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(window, window, heads, dim)
    return attn.proj(out[:h, :w].reshape(1, h * w, heads * dim))


def test_windowed_attention_matches_direct_computation():
    attn = Attention(12, num_heads=3, qkv_bias=True).double().eval()
    for grid, window in [((5, 7), 3), ((6, 6), 3), ((4, 5), 7)]:
        x = torch.randn(1, grid[0] * grid[1], 12, dtype=torch.float64)
        got = windowed_attention(attn, x, grid, window)
        assert torch.allclose(got, naive_windowed(attn, x, grid, window), atol=1e-10), (grid, window)


def test_single_unpadded_window_is_global_attention():
    attn = Attention(12, num_heads=3, qkv_bias=True).double().eval()
    x = torch.randn(2, 16, 12, dtype=torch.float64)
    assert torch.allclose(windowed_attention(attn, x, (4, 4), 4), attn(x), atol=1e-10)
