"""Mask2Former for semantic segmentation: upstream ViT-Adapter's ``Mask2FormerHead`` in plain PyTorch.

Three parts (docs/mask2former.md has the conventions in full):

- a pixel decoder: 1x1 projections of the coarsest ``num_levels`` pyramid levels, deformable-attention
  encoder layers over them (through ``vitadapter::ms_deform_attn``), then an FPN step per remaining
  finer level, ending in ``mask_feature`` at the finest level's stride (4 on an adapter pyramid);
- a transformer decoder of learned queries: per layer masked cross-attention into one encoder level
  (coarse to fine, cycling), self-attention and an FFN, all post-norm;
- a prediction after the learned queries and after every layer: class logits (``num_classes`` + one
  "no object" column) and mask logits at the mask features' stride.

Module and parameter names follow upstream's, so its ``decode_head.*`` state dict loads as is.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.msda import MSDeformAttn
from . import _mask2former_loss as L


class Mask2FormerOutput(NamedTuple):
    """Per-prediction logits, first the one from the learned queries, then one after each decoder
    layer (``decoder_layers + 1`` in all; the last is the final prediction, the one inference uses).

    ``class_logits[i]``: (B, num_queries, num_classes + 1), the last column is "no object".
    ``mask_logits[i]``: (B, num_queries, H / 4, W / 4) for an adapter pyramid (the stride of the
    finest input level).
    """

    class_logits: list[torch.Tensor]
    mask_logits: list[torch.Tensor]


def sine_positions(height: int, width: int, channels: int, device: torch.device | None = None,
                   temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine encoding of an unpadded (height, width) map, (height * width, channels).

    Row and column numbers count from 1 and are scaled to (0, 2*pi] (divided by the last + 1e-6); the
    first half of the channels encodes the row, the second the column, each alternating sin (even
    channels) and cos (odd channels) with frequency 1 / temperature ** (2 * (k // 2) / (channels / 2)).
    """
    half = channels // 2
    if channels % 4:
        raise ValueError(f"the sine encoding needs channels divisible by 4, got {channels}")

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device)
        pos = pos / (pos[-1:] + 1e-6) * (2 * math.pi)
        k = torch.arange(half, dtype=torch.float32, device=device)
        angles = pos[:, None] / temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / half)
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1).view(n, half)

    rows, cols = axis(height), axis(width)
    return torch.cat([rows[:, None].expand(height, width, half), cols[None].expand(height, width, half)], -1).view(
        height * width, channels
    )


# ---- pixel decoder ------------------------------------------------------------------------------


class ConvGN(nn.Module):
    """Conv -> GroupNorm (-> ReLU), stored as ``conv.*`` and ``gn.*`` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int, bias: bool, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """Linear -> ReLU -> Linear, without the residual (keys ``layers.0.0.*``, ``layers.1.*``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True)), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDA(query x + pos, value x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn(dim, num_heads, num_levels, num_points)])
        self.ffns = nn.ModuleList([FFN(dim, ffn_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.norms[0](x + self.attentions[0](x + pos, reference_points, x, shapes))
        return self.norms[1](x + self.ffns[0](x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])


def pixel_centres(height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """((j + 0.5) / width, (i + 0.5) / height) of every pixel, row-major: (height * width, 2)."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)], -1).view(-1, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Upstream's pixel decoder.

    Encoder level i is input level ``len(in_channels) - 1 - i`` (coarse to fine): ``input_convs[i]``,
    ``level_encoding.weight[i]`` and the returned ``multi_scale_features[i]`` follow that order.
    Every finer input level j gets ``lateral_convs[j]`` plus the upsampled previous output, then
    ``output_convs[j]``; ``mask_feature`` projects the finest result.
    """

    def __init__(self, in_channels: Sequence[int], feat_channels: int, out_channels: int, num_levels: int,
                 num_groups: int, num_layers: int, num_heads: int, num_points: int, ffn_channels: int):
        super().__init__()
        num_inputs = len(in_channels)
        if not 1 <= num_levels <= num_inputs:
            raise ValueError(f"num_levels must be between 1 and the number of inputs ({num_inputs}), got {num_levels}")
        self.num_levels = num_levels
        self.input_convs = nn.ModuleList(
            ConvGN(in_channels[num_inputs - 1 - i], feat_channels, 1, num_groups, bias=True, relu=False)
            for i in range(num_levels)
        )
        self.encoder = DeformableEncoder(num_layers, dim=feat_channels, num_heads=num_heads, num_levels=num_levels,
                                         num_points=num_points, ffn_channels=ffn_channels)
        self.level_encoding = nn.Embedding(num_levels, feat_channels)
        # upstream applies lateral_convs[j] / output_convs[j] to input level j
        fpn_levels = range(num_inputs - num_levels)
        self.lateral_convs = nn.ModuleList(
            ConvGN(in_channels[j], feat_channels, 1, num_groups, bias=False, relu=False) for j in fpn_levels
        )
        self.output_convs = nn.ModuleList(
            ConvGN(feat_channels, feat_channels, 3, num_groups, bias=False, relu=True) for _ in fpn_levels
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features fine to coarse -> (mask features at the finest stride, encoder outputs coarse to fine)."""
        batch, device = features[0].shape[0], features[0].device
        # locations in at least float32 (the op's convention), in float64 for a float64 model
        coord_dtype = torch.promote_types(features[0].dtype, torch.float32)
        tokens, positions, centres, shapes = [], [], [], []
        for i, conv in enumerate(self.input_convs):
            x = conv(features[len(features) - 1 - i])
            h, w = x.shape[-2:]
            tokens.append(x.flatten(2).transpose(1, 2))
            positions.append(sine_positions(h, w, x.shape[1], device) + self.level_encoding.weight[i])
            centres.append(pixel_centres(h, w, device, coord_dtype))
            shapes.append((h, w))
        x = torch.cat(tokens, 1)
        pos = torch.cat(positions, 0).to(x.dtype)
        reference_points = torch.cat(centres, 0)
        for layer in self.encoder.layers:
            x = layer(x, pos, reference_points, shapes)

        outs = [
            part.transpose(1, 2).reshape(batch, -1, h, w)
            for part, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)
        ]
        y = outs[-1]
        for j in reversed(range(len(self.lateral_convs))):
            lateral = self.lateral_convs[j](features[j])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output_convs[j](y)
        return self.mask_feature(y), outs


# ---- transformer decoder ------------------------------------------------------------------------


class PackedAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight`` rows q, k, v;
    ``in_proj_bias``; ``out_proj``), batch-first, through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} must be divisible by its heads ({num_heads})")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                blocked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q, C), (B, K, C), (B, K, C); ``blocked`` (B, Q, K), True where a query may not look."""
        batch, queries, dim = query.shape
        heads = self.num_heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, bias).view(batch, x.shape[1], heads, dim // heads).transpose(1, 2)

        allowed = None if blocked is None else ~blocked[:, None]
        out = F.scaled_dot_product_attention(split(query, wq, bq), split(key, wk, bk), split(value, wv, bv),
                                             attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(batch, queries, dim))


class AttentionSlot(nn.Module):
    """Holds the attention as ``.attn`` (upstream's ``attentions.{i}.attn.*`` keys)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn = PackedAttention(dim, num_heads)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.attn(*args, **kwargs)


class MaskedDecoderLayer(nn.Module):
    """Post-norm: x = LN(x + CrossAttn(x + qpos, memory + kpos, memory, mask));
    x = LN(x + SelfAttn(x + qpos, x + qpos, x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionSlot(dim, num_heads), AttentionSlot(dim, num_heads)])
        self.ffns = nn.ModuleList([FFN(dim, ffn_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                blocked: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](x + self.attentions[0](x + query_pos, key, value, blocked))
        q = x + query_pos
        x = self.norms[1](x + self.attentions[1](q, q, x))
        return self.norms[2](x + self.ffns[0](x))


class MaskedDecoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_channels: int):
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(dim, num_heads, ffn_channels) for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(dim)


# ---- the head -----------------------------------------------------------------------------------


class Mask2FormerHead(nn.Module):
    """Upstream ViT-Adapter's Mask2Former head for semantic segmentation.

    ``in_channels``: the channels of the input levels, finest first (an adapter pyramid: strides 4, 8,
    16, 32). ``feat_channels``: the width of the pixel decoder and the transformer decoder (the sine
    encoding takes ``feat_channels / 2`` per axis); ``out_channels``: the width of the mask features
    and mask embeddings. The encoder and the decoder work on the ``num_levels`` coarsest levels.
    ``in_index`` picks the inputs from a longer feature list (default: all, in order).

    Training settings (used by ``loss`` only): the loss weights (``loss_*_weight``), the weight of the
    "no object" class in the class cross-entropy, the matching cost weights (``match_*_weight``), the
    dice epsilons, and the point sampling (``num_points`` per mask, uniform for matching; for the loss
    ``oversample_ratio`` x candidates of which the ``importance_sample_ratio`` most uncertain are kept
    and the rest drawn uniformly).
    """

    stride = 4
    align_corners = False

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_channels: int = 256,
        out_channels: int = 256,
        num_queries: int = 100,
        num_classes: int = 150,
        *,
        num_levels: int = 3,
        in_index: Sequence[int] | None = None,
        num_groups: int = 32,
        encoder_layers: int = 6,
        encoder_heads: int = 8,
        encoder_points: int = 4,
        encoder_ffn_channels: int = 1024,
        decoder_layers: int = 9,
        decoder_heads: int = 8,
        decoder_ffn_channels: int = 2048,
        loss_class_weight: float = 2.0,
        loss_mask_weight: float = 5.0,
        loss_dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        match_class_weight: float = 2.0,
        match_mask_weight: float = 5.0,
        match_dice_weight: float = 5.0,
        dice_eps: float = 1.0,
        match_dice_eps: float = 1.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if in_index is not None and len(in_index) != len(in_channels):
            raise ValueError(f"in_index {list(in_index)} must name one input per entry of in_channels {in_channels}")
        if feat_channels % 4:
            raise ValueError(f"feat_channels must be divisible by 4 (the sine encoding), got {feat_channels}")
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1]")
        self.in_channels = in_channels
        self.in_index = None if in_index is None else [int(i) for i in in_index]
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_levels = num_levels
        self.decoder_heads = decoder_heads

        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, feat_channels, out_channels, num_levels, num_groups, encoder_layers, encoder_heads,
            encoder_points, encoder_ffn_channels,
        )
        self.transformer_decoder = MaskedDecoder(decoder_layers, feat_channels, decoder_heads, decoder_ffn_channels)
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )

        self.loss_weights = (float(loss_class_weight), float(loss_mask_weight), float(loss_dice_weight))
        self.match_weights = (float(match_class_weight), float(match_mask_weight), float(match_dice_weight))
        self.no_object_weight = float(no_object_weight)
        self.dice_eps, self.match_dice_eps = float(dice_eps), float(match_dice_eps)
        self.num_points = int(num_points)
        self.oversample_ratio, self.importance_sample_ratio = float(oversample_ratio), float(importance_sample_ratio)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's initialisation (the embeddings, class and mask heads keep PyTorch's defaults)."""
        decoder = self.pixel_decoder
        for unit in decoder.input_convs:
            nn.init.xavier_uniform_(unit.conv.weight)
            nn.init.zeros_(unit.conv.bias)
        for conv in [u.conv for u in (*decoder.lateral_convs, *decoder.output_convs)] + [decoder.mask_feature]:
            nn.init.kaiming_uniform_(conv.weight, a=1)  # caffe2's "xavier"
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(decoder.level_encoding.weight)
        for p in decoder.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for layer in decoder.encoder.layers:
            layer.attentions[0].reset_parameters()
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    # ---- inference --------------------------------------------------------------------------

    def _inputs(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        features = list(features) if self.in_index is None else [features[i] for i in self.in_index]
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature levels, got {len(features)}")
        return features

    def _predict(self, x: torch.Tensor, mask_features: torch.Tensor, next_size: tuple[int, int] | None):
        """(class logits, mask logits, blocked positions for the next cross-attention or None)."""
        x = self.transformer_decoder.post_norm(x)
        class_logits = self.cls_embed(x)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        if next_size is None:
            return class_logits, mask_logits, None
        with torch.no_grad():
            resized = F.interpolate(mask_logits, size=next_size, mode="bilinear", align_corners=False)
            blocked = resized.flatten(2).sigmoid() < 0.5
        return class_logits, mask_logits, blocked

    def forward(self, features: Sequence[torch.Tensor]) -> Mask2FormerOutput:
        """features: the pyramid, finest first (B, in_channels[i], H_i, W_i) -> Mask2FormerOutput."""
        mask_features, memories = self.pixel_decoder(self._inputs(features))
        batch = mask_features.shape[0]
        keys, values, sizes = [], [], []
        for i, memory in enumerate(memories):
            h, w = memory.shape[-2:]
            value = memory.flatten(2).transpose(1, 2) + self.level_embed.weight[i]
            keys.append(value + sine_positions(h, w, value.shape[-1], value.device).to(value.dtype))
            values.append(value)
            sizes.append((h, w))

        x = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        layers = self.transformer_decoder.layers
        class_logits, mask_logits, blocked = self._predict(x, mask_features, sizes[0] if len(layers) else None)
        all_classes, all_masks = [class_logits], [mask_logits]
        for i, layer in enumerate(layers):
            level = i % self.num_levels
            # a query that would see nothing sees everything instead
            blocked = blocked & ~blocked.all(-1, keepdim=True)
            x = layer(x, query_pos, keys[level], values[level], blocked)
            last = i == len(layers) - 1
            class_logits, mask_logits, blocked = self._predict(
                x, mask_features, None if last else sizes[(i + 1) % self.num_levels]
            )
            all_classes.append(class_logits)
            all_masks.append(mask_logits)
        return Mask2FormerOutput(all_classes, all_masks)

    @staticmethod
    def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """Per-class scores sum_q softmax(class)[q, c] * sigmoid(mask)[q]: (B, num_classes, h, w)."""
        probs = class_logits.softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())

    def semantic_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Upstream's semantic inference from the last prediction, (B, num_classes, H / 4, W / 4).

        These are probabilities-like scores, not logits in the strict sense: mmseg resizes them to
        the image and applies one more softmax over classes before the argmax, which leaves the
        argmax unchanged.
        """
        out = self(features)
        return self.semantic_inference(out.class_logits[-1], out.mask_logits[-1])

    # ---- training ---------------------------------------------------------------------------

    def loss(self, features: Sequence[torch.Tensor], labels: torch.Tensor, ignore_index: int = 255
             ) -> dict[str, torch.Tensor]:
        """Upstream's training loss from the pyramid and (B, H, W) class labels at image size."""
        return self.loss_from_outputs(self(features), labels, ignore_index)

    def loss_from_outputs(self, outputs: Mask2FormerOutput, labels: torch.Tensor, ignore_index: int = 255
                          ) -> dict[str, torch.Tensor]:
        """The loss of every prediction (deep supervision), as upstream names it.

        Each label map becomes one binary mask per class present (``ignore_index`` pixels belong to
        none); each prediction is matched one-to-one to them (Hungarian, on class probability, mask
        BCE and dice at ``num_points`` uniform points) and scored with the class cross-entropy
        (unmatched queries target "no object", weighted ``no_object_weight``) and, for the matched
        queries, mask BCE and dice at importance-sampled points. Keys: ``loss_cls``, ``loss_mask``,
        ``loss_dice`` for the final prediction and ``d{i}.loss_*`` for the earlier ones (``d0``: the
        learned queries); the training objective is their sum.
        """
        targets = L.semantic_targets(labels, self.num_classes, ignore_index)
        class_weight = torch.ones(self.num_classes + 1, device=labels.device)
        class_weight[-1] = self.no_object_weight
        settings = L.LossSettings(
            loss_weights=self.loss_weights, match_weights=self.match_weights, class_weight=class_weight,
            dice_eps=self.dice_eps, match_dice_eps=self.match_dice_eps, num_points=self.num_points,
            oversample_ratio=self.oversample_ratio, importance_sample_ratio=self.importance_sample_ratio,
        )
        losses: dict[str, torch.Tensor] = {}
        count = len(outputs.class_logits)
        for i, (class_logits, mask_logits) in enumerate(zip(outputs.class_logits, outputs.mask_logits)):
            prefix = "" if i == count - 1 else f"d{i}."
            cls, mask, dice = L.prediction_loss(class_logits.float(), mask_logits.float(), targets, settings)
            losses[prefix + "loss_cls"], losses[prefix + "loss_mask"], losses[prefix + "loss_dice"] = cls, mask, dice
        return losses
