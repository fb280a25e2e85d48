"""An independent, functional transcription of upstream's Mask2FormerHead forward (docs/mask2former.md).

Sequence-first like upstream (tokens, batch, channels), reading an upstream-layout ``decode_head``
state dict (prefix removed). It computes the sine encoding from a padding mask by cumulative sums,
the reference points from strides, deformable attention by ``grid_sample`` per level, and the
decoder attentions with an explicit softmax over ``-inf``-filled logits and a mask repeated per head.
Tests check it against the golden fixture, then use it for configurations the fixture lacks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upstream_reference import grid_sample_deform_attn


def _sine(mask: torch.Tensor, num_feats: int) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2 * num_feats, H, W), upstream's normalised form."""
    not_mask = 1 - mask.int()
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    b, h, w = mask.shape
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def reference_forward(sd: dict, cfg: dict, feats: list[torch.Tensor]):
    """-> (mask_features, multi-scale features, class logits per prediction, mask logits per prediction)."""
    dtype = feats[0].dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    n_in = len(feats)
    levels = cfg.get("num_levels", 3)
    groups = cfg["num_groups"]
    e_heads, e_points = cfg["encoder_heads"], cfg["encoder_points"]
    d_heads = cfg["decoder_heads"]
    b = feats[0].shape[0]
    strides = [4 * 2 ** i for i in range(n_in)]

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd.get(key + ".bias"))

    def ln(x, key):
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], 1e-5)

    def conv_gn(x, key, relu):
        w = sd[key + ".conv.weight"]
        x = F.conv2d(x, w, sd.get(key + ".conv.bias"), padding=w.shape[-1] // 2)
        x = F.group_norm(x, groups, sd[key + ".gn.weight"], sd[key + ".gn.bias"], 1e-5)
        return F.relu(x) if relu else x

    def ffn(x, key):
        return x + lin(F.relu(lin(x, key + ".layers.0.0")), key + ".layers.1")

    # ---- pixel decoder: encoder on the coarsest levels, coarse to fine
    srcs, poss, shapes, refs = [], [], [], []
    for i in range(levels):
        lvl = n_in - 1 - i
        x = conv_gn(feats[lvl], f"pixel_decoder.input_convs.{i}", relu=False)
        hh, ww = x.shape[-2:]
        pos = _sine(torch.zeros(b, hh, ww, dtype=torch.bool), x.shape[1] // 2).to(dtype)
        pos = pos + sd["pixel_decoder.level_encoding.weight"][i].view(1, -1, 1, 1)
        s = strides[lvl]
        yy, xx = torch.meshgrid((torch.arange(hh) + 0.5) * s, (torch.arange(ww) + 0.5) * s, indexing="ij")
        refs.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(dtype) / torch.tensor([ww * s, hh * s], dtype=dtype))
        srcs.append(x.flatten(2).permute(2, 0, 1))
        poss.append(pos.flatten(2).permute(2, 0, 1))
        shapes.append((hh, ww))
    query = torch.cat(srcs)
    pos = torch.cat(poss)
    ref = torch.cat(refs)
    n_q = query.shape[0]

    def msda(key, x):
        q = (x + pos).transpose(0, 1)  # (B, N, C)
        value = lin(x.transpose(0, 1), key + ".value_proj")
        hd = value.shape[-1] // e_heads
        value = value.view(b, n_q, e_heads, hd)
        off = lin(q, key + ".sampling_offsets").view(b, n_q, e_heads, levels, e_points, 2)
        att = lin(q, key + ".attention_weights").view(b, n_q, e_heads, levels * e_points).softmax(-1)
        att = att.view(b, n_q, e_heads, levels, e_points)
        out = lin(grid_sample_deform_attn(value, shapes, ref, off, att), key + ".output_proj")
        return x + out.transpose(0, 1)

    x = query
    for i in range(cfg["encoder_layers"]):
        key = f"pixel_decoder.encoder.layers.{i}"
        x = ln(msda(key + ".attentions.0", x), key + ".norms.0")
        x = ln(ffn(x, key + ".ffns.0"), key + ".norms.1")
    memory = x.permute(1, 2, 0)
    outs = [m.reshape(b, -1, hh, ww) for m, (hh, ww) in zip(memory.split([h * w for h, w in shapes], -1), shapes)]
    for i in range(n_in - levels - 1, -1, -1):
        cur = conv_gn(feats[i], f"pixel_decoder.lateral_convs.{i}", relu=False)
        y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
        outs.append(conv_gn(y, f"pixel_decoder.output_convs.{i}", relu=True))
    ms = outs[:levels]
    mask_features = F.conv2d(outs[-1], sd["pixel_decoder.mask_feature.weight"], sd["pixel_decoder.mask_feature.bias"])

    # ---- transformer decoder, sequence-first
    mems, kpos = [], []
    for i in range(levels):
        m = ms[i].flatten(2).permute(2, 0, 1) + sd["level_embed.weight"][i].view(1, 1, -1)
        hh, ww = ms[i].shape[-2:]
        mems.append(m)
        kpos.append(_sine(torch.zeros(b, hh, ww, dtype=torch.bool), m.shape[-1] // 2).to(dtype).flatten(2).permute(2, 0, 1))

    def mha(key, q, k, v, mask):
        # q (Lq, B, C); mask (B * heads, Lq, Lk) True = may not attend
        c = q.shape[-1]
        hd = c // d_heads
        w, bias = sd[key + ".in_proj_weight"], sd[key + ".in_proj_bias"]
        qq = F.linear(q, w[:c], bias[:c]).reshape(q.shape[0], b * d_heads, hd).transpose(0, 1)
        kk = F.linear(k, w[c:2 * c], bias[c:2 * c]).reshape(k.shape[0], b * d_heads, hd).transpose(0, 1)
        vv = F.linear(v, w[2 * c:], bias[2 * c:]).reshape(v.shape[0], b * d_heads, hd).transpose(0, 1)
        logits = qq @ kk.transpose(1, 2) / math.sqrt(hd)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        out = (logits.softmax(-1) @ vv).transpose(0, 1).reshape(q.shape[0], b, c)
        return lin(out, key + ".out_proj")

    def head(x, size):
        x = ln(x, "transformer_decoder.post_norm").transpose(0, 1)
        cls = lin(x, "cls_embed")
        e = F.relu(lin(F.relu(lin(x, "mask_embed.0")), "mask_embed.2"))
        mask = torch.einsum("bqc,bchw->bqhw", lin(e, "mask_embed.4"), mask_features)
        am = F.interpolate(mask, size, mode="bilinear", align_corners=False)
        am = am.flatten(2).unsqueeze(1).repeat(1, d_heads, 1, 1).flatten(0, 1).sigmoid() < 0.5
        return cls, mask, am

    nq = sd["query_feat.weight"].shape[0]
    qf = sd["query_feat.weight"].unsqueeze(1).repeat(1, b, 1)
    qe = sd["query_embed.weight"].unsqueeze(1).repeat(1, b, 1)
    cls, mask, am = head(qf, ms[0].shape[-2:])
    all_cls, all_mask = [cls], [mask]
    for i in range(cfg["decoder_layers"]):
        lvl = i % levels
        am[torch.where(am.sum(-1) == am.shape[-1])] = False
        key = f"transformer_decoder.layers.{i}"
        x = qf
        x = ln(x + mha(key + ".attentions.0.attn", x + qe, mems[lvl] + kpos[lvl], mems[lvl], am), key + ".norms.0")
        x = ln(x + mha(key + ".attentions.1.attn", x + qe, x + qe, x, None), key + ".norms.1")
        qf = ln(ffn(x, key + ".ffns.0"), key + ".norms.2")
        cls, mask, am = head(qf, ms[(i + 1) % levels].shape[-2:])
        all_cls.append(cls)
        all_mask.append(mask)
    assert all(c.shape[1] == nq for c in all_cls)
    return mask_features, ms, all_cls, all_mask
