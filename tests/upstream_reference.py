"""An independent, functional transcription of upstream's ViTAdapter forward (docs/upstream.md).

It reads an upstream-layout state dict directly (``pos_embed`` with its cls slot, ``gamma1``...),
uses explicit softmax attention, upstream's ``N // 21`` split of the pyramid tokens and the
unfold-style zero-padded windows. Only valid where upstream is: inputs that are multiples of 32,
eval mode. Tests use it to check configurations the golden fixtures do not cover.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upstream_forward(sd: dict, cfg: dict, codebase: str, image: torch.Tensor) -> list[torch.Tensor]:
    depth = cfg.get("depth", 12)
    dim = cfg.get("embed_dim", 768)
    heads = cfg.get("num_heads", 12)
    d_heads = cfg.get("deform_num_heads", 6)
    points = cfg.get("n_points", 4)
    ratio = cfg.get("deform_ratio", 1.0)
    ranges = cfg["interaction_indexes"]
    with_cffn = cfg.get("with_cffn", True)
    extra = cfg.get("use_extra_extractor", True)
    windows = cfg.get("window_attn", [False] * depth)
    window_sizes = cfg.get("window_size", [14] * depth)
    g = cfg.get("pretrain_size", 224) // 16
    b, _, h, w = image.shape
    H, W = h // 16, w // 16

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd.get(key + ".bias"))

    def ln(x, key):
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], 1e-6)

    def bn(x, key):
        return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                            sd[key + ".bias"], False, 0.0, 1e-5)

    def conv_bn_relu(x, conv, norm, stride):
        return F.relu(bn(F.conv2d(x, sd[conv + ".weight"], stride=stride, padding=1), norm))

    # spatial prior
    x1 = conv_bn_relu(image, "spm.stem.0", "spm.stem.1", 2)
    x1 = conv_bn_relu(x1, "spm.stem.3", "spm.stem.4", 1)
    x1 = conv_bn_relu(x1, "spm.stem.6", "spm.stem.7", 1)
    x1 = F.max_pool2d(x1, 3, 2, 1)
    x2 = conv_bn_relu(x1, "spm.conv2.0", "spm.conv2.1", 2)
    x3 = conv_bn_relu(x2, "spm.conv3.0", "spm.conv3.1", 2)
    x4 = conv_bn_relu(x3, "spm.conv4.0", "spm.conv4.1", 2)
    maps = [F.conv2d(m, sd[f"spm.fc{i + 1}.weight"], sd[f"spm.fc{i + 1}.bias"]) for i, m in enumerate((x1, x2, x3, x4))]
    c1 = maps[0]
    c = torch.cat([m.flatten(2).transpose(1, 2) + sd["level_embed"][i] for i, m in enumerate(maps[1:])], 1)

    def ref_points(shapes):
        pts = []
        for hh, ww in shapes:
            yy, xx = torch.meshgrid(torch.linspace(0.5, hh - 0.5, hh, dtype=image.dtype),
                                    torch.linspace(0.5, ww - 0.5, ww, dtype=image.dtype), indexing="ij")
            pts.append(torch.stack([xx.reshape(-1) / ww, yy.reshape(-1) / hh], -1))
        return torch.cat(pts)

    c_shapes = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    inj_ref, ext_ref = ref_points([(H, W)]), ref_points(c_shapes)

    def msda(key, query, ref, feat, shapes):
        n_levels = len(shapes)
        q_len = query.shape[1]
        value = lin(feat, key + ".value_proj")
        hd = value.shape[-1] // d_heads
        value = value.view(b, -1, d_heads, hd)
        off = lin(query, key + ".sampling_offsets").view(b, q_len, d_heads, n_levels, points, 2)
        att = lin(query, key + ".attention_weights").view(b, q_len, d_heads, n_levels * points).softmax(-1)
        out = grid_sample_deform_attn(value, shapes, ref, off, att.view(b, q_len, d_heads, n_levels, points))
        return lin(out, key + ".output_proj")

    def dwconv(x, key):
        n = x.shape[1] // 21
        chs = x.shape[-1]
        parts = [(x[:, :16 * n], 2 * H, 2 * W), (x[:, 16 * n:20 * n], H, W), (x[:, 20 * n:], H // 2, W // 2)]
        return torch.cat([
            F.conv2d(p.transpose(1, 2).reshape(b, chs, hh, ww), sd[key + ".weight"], sd[key + ".bias"],
                     padding=1, groups=chs).flatten(2).transpose(1, 2)
            for p, hh, ww in parts], 1)

    def extractor(key, c, x):
        c = c + msda(key + ".attn", ln(c, key + ".query_norm"), ext_ref, ln(x, key + ".feat_norm"), [(H, W)])
        if with_cffn:
            y = lin(ln(c, key + ".ffn_norm"), key + ".ffn.fc1")
            y = lin(F.gelu(dwconv(y, key + ".ffn.dwconv.dwconv")), key + ".ffn.fc2")
            c = c + y
        return c

    def attention(x, key, windowed, ws):
        qkv = lin(x, key + ".qkv")
        hd = dim // heads
        if not windowed:
            q, k, v = qkv.view(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
            o = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1) @ v
            return lin(o.transpose(1, 2).reshape(b, -1, dim), key + ".proj")
        Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
        grid = F.pad(qkv.transpose(1, 2).reshape(b, 3 * dim, H, W), [0, Wp - W, 0, Hp - H])
        cols = F.unfold(grid, ws, stride=ws)  # (b, 3*dim*ws*ws, L)
        n_win = cols.shape[-1]
        cols = cols.view(b, 3 * dim, ws * ws, n_win).permute(0, 3, 2, 1).reshape(b, n_win, ws * ws, 3, heads, hd)
        q, k, v = cols.permute(3, 0, 1, 4, 2, 5)
        o = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1) @ v  # (b, L, heads, ws*ws, hd)
        o = o.permute(0, 2, 4, 3, 1).reshape(b, dim * ws * ws, n_win)
        o = F.fold(o, (Hp, Wp), ws, stride=ws)[:, :, :H, :W].reshape(b, dim, H * W).transpose(1, 2)
        return lin(o, key + ".proj")

    def block(x, i):
        key = f"blocks.{i}"
        g1 = sd.get(key + ".gamma1", 1.0)
        g2 = sd.get(key + ".gamma2", 1.0)
        x = x + g1 * attention(ln(x, key + ".norm1"), key + ".attn", windows[i], window_sizes[i])
        y = lin(F.gelu(lin(ln(x, key + ".norm2"), key + ".mlp.fc1")), key + ".mlp.fc2")
        return x + g2 * y

    x = F.conv2d(image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"][:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    x = x + F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)

    outs = []
    for j, (start, end) in enumerate(ranges):
        key = f"interactions.{j}"
        q = ln(x, key + ".injector.query_norm")
        x = x + sd[key + ".injector.gamma"] * msda(key + ".injector.attn", q, inj_ref,
                                                     ln(c, key + ".injector.feat_norm"), c_shapes)
        for i in range(start, end + 1):
            x = block(x, i)
        c = extractor(key + ".extractor", c, x)
        if extra and j == len(ranges) - 1:
            c = extractor(key + ".extra_extractors.0", c, x)
            c = extractor(key + ".extra_extractors.1", c, x)
        outs.append(x.transpose(1, 2).reshape(b, dim, H, W))

    n2, n3 = maps[1].shape[-2] * maps[1].shape[-1], maps[2].shape[-2] * maps[2].shape[-1]
    c2 = c[:, :n2].transpose(1, 2).reshape(b, dim, 2 * H, 2 * W)
    c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(b, dim, H, W)
    c4 = c[:, n2 + n3:].transpose(1, 2).reshape(b, dim, H // 2, W // 2)
    c1 = F.conv_transpose2d(c2, sd["up.weight"], sd["up.bias"], stride=2) + c1
    levels = [c1, c2, c3, c4]
    if cfg.get("add_vit_feature", True):
        feats = outs if codebase == "segmentation" else [outs[-1]] * 4
        levels = [lv + F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else lv + f
                  for lv, f, s in zip(levels, feats, (4, 2, 1, 0.5))]
    return [bn(lv, f"norm{i + 1}") for i, lv in enumerate(levels)]


def grid_sample_deform_attn(value, shapes, ref, off, att):
    """Deformable attention the way upstream's pure-PyTorch fallback computes it: locations
    ``ref + offset / (W, H)``, one ``grid_sample`` per level (zero padding, pixel centres), weights
    summed over levels and points. value (B, S, heads, hd), ref (Q, 2), off (B, Q, heads, L, P, 2),
    att (B, Q, heads, L, P) -> (B, Q, heads * hd)."""
    b, q_len, heads, _, points, _ = off.shape
    hd = value.shape[-1]
    norm = torch.tensor([[ww, hh] for hh, ww in shapes], dtype=value.dtype)
    loc = ref[None, :, None, None, None, :] + off / norm[None, None, None, :, None, :]
    out = torch.zeros(b, heads, hd, q_len, dtype=value.dtype)
    start = 0
    for lvl, (hh, ww) in enumerate(shapes):
        v = value[:, start:start + hh * ww].permute(0, 2, 3, 1).reshape(b * heads, hd, hh, ww)
        start += hh * ww
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).reshape(b * heads, q_len, points, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out += (sampled.view(b, heads, hd, q_len, points) * att[:, :, :, lvl].transpose(1, 2).unsqueeze(2)).sum(-1)
    return out.reshape(b, heads * hd, q_len).transpose(1, 2)
