"""ViT-Adapter on a timm VisionTransformer: image -> 4-level feature pyramid (strides 4, 8, 16, 32).

Model class first, then its default cfgs and the ``@register_model`` entrypoints, timm style.
"""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.layers import trunc_normal_
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from .._meta import meta_device
from ..layers import InteractionBlock, MSDeformAttn, SpatialPriorModule
from ..trunks import create_trunk, create_vit, driver_for
from .checkpoints import load_pretrained

STRIDES = (4, 8, 16, 32)
# Upstream's spatial prior module and pyramid need every stride up to 32 to divide the image.
SIZE_DIVISOR = 32
MIN_SIZE = 32

VitFeatureSource = Literal["interactions", "final"]
TrunkSpec = Union[str, nn.Module, None]

# The ViT upstream's configs build when no timm trunk is given (DeiT-B shape, 224-px position grid).
UPSTREAM_VIT_DEFAULTS = dict(
    in_chans=3, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
    layer_scale=True, pretrain_size=224,
)


class ViTAdapter(nn.Module):
    """A timm ViT (``self.vit``) with ViT-Adapter's spatial prior, injectors and extractors.

    The trunk is any timm ViT of a supported family (``VisionTransformer``: DeiT, AugReg, DeiT3,
    DINOv2 with patch 14 and registers; ``Beit``: BEiT, BEiTv2; ``Eva``: EVA-02, DINOv3): a timm
    name (``trunk="vit_base_patch14_dinov2.lvd142m"``, built with ``trunk_kwargs``, its timm weights
    loaded when ``pretrained_trunk``) or a module the user built (wrapped, not copied). Without
    ``trunk``, upstream's own ViT is built from ``embed_dim``, ``depth``, ... (see
    ``UPSTREAM_VIT_DEFAULTS``).

    The three published designs are options of this one model:

    - upstream ViT-Adapter: an injector before and extractors after each interaction's ViT blocks;
      ``vit_feature_source`` picks how ViT features join the pyramid: "interactions" (segmentation
      codebase: level k gets interaction k's output) or "final" (detection codebase);
    - DINOv2's adapter: the same on a patch-14 trunk with a cls token, which rides along inside the
      ViT blocks only; the ViT grid (h//14) and the pyramid's grids differ, normalised sampling
      coordinates bridge them;
    - DINOv3's ``extractor_only=True``: no injectors, the trunk runs once and its outputs at the
      interaction indexes go through its final norm before the extractors.

    ``interaction_indexes`` holds inclusive block ranges (``[[0, 2], [3, 5], ...]``) or the last
    block of each interaction (``[2, 5, 8, 11]``); by default four even groups of the depth.
    ``window_size`` lists one attention window per block (``None``: global). ``adapter_norm_eps``: the
    injectors' and extractors' LayerNorm eps (upstream's 1e-6; its Uni-Perceiver adapter's 1e-5). ``freeze_trunk``
    stops the trunk's gradients and keeps it in eval mode; in extractor-only mode it also runs
    under ``no_grad``. Any input of at least 32x32 works: it is zero-padded to a multiple of 32 and
    the outputs are cropped to ``ceil(h / stride) x ceil(w / stride)``. ``drop_rate`` (after the
    position embedding and in the blocks' projections, as in upstream's ViT), ``attn_drop_rate`` and
    ``drop_path_rate`` apply to upstream's ViT and to a trunk given by name alike. ``model_args`` holds the
    keyword arguments that rebuild this configuration (what ``config.json`` stores).
    """

    def __init__(
        self,
        *,
        trunk: TrunkSpec = None,
        trunk_kwargs: Optional[Mapping[str, Any]] = None,
        pretrained_trunk: bool = False,
        in_chans: Optional[int] = None,
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        mlp_ratio: Optional[float] = None,
        qkv_bias: Optional[bool] = None,
        layer_scale: Optional[bool] = None,
        pretrain_size: Optional[int] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        deform_ratio: float = 1.0,
        init_values: float = 0.0,
        interaction_indexes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        vit_feature_source: VitFeatureSource = "interactions",
        window_size: Optional[Sequence[Optional[int]]] = None,
        adapter_norm_eps: float = 1e-6,
        extractor_only: bool = False,
        freeze_trunk: bool = False,
        num_classes: int = 0,
    ):
        # Every constructor argument, taken before any other local exists: config.json stores them
        # so that any configuration (including ones load_upstream builds) can be rebuilt.
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if num_classes:
            raise ValueError(f"ViTAdapter is a feature backbone without a classifier: num_classes must be 0, got {num_classes}")
        if vit_feature_source not in ("interactions", "final"):
            raise ValueError(f"vit_feature_source must be 'interactions' or 'final', got {vit_feature_source!r}")

        self.vit, trunk_name, vit_args = _build_trunk(args)
        _drop_unused_parts(self.vit, keep_final_norm=extractor_only)
        self.trunk = driver_for(self.vit, window_size)
        if self.trunk.patch_size > 16:
            raise ValueError(f"patch size {self.trunk.patch_size} is coarser than the pyramid's 1/16 level (at most 16)")
        depth = self.trunk.depth
        self.interaction_indexes = _interaction_ranges(interaction_indexes, depth)
        if extractor_only and any(b[1] <= a[1] for a, b in zip(self.interaction_indexes, self.interaction_indexes[1:])):
            raise ValueError(f"extractor-only interaction_indexes must end at increasing blocks, got {self.interaction_indexes}")
        if add_vit_feature and vit_feature_source == "interactions" and len(self.interaction_indexes) != 4:
            raise ValueError(
                f"interaction_indexes lists {len(self.interaction_indexes)} interactions: adding each interaction's ViT output to its "
                "pyramid level needs exactly 4 (one per level); use add_vit_feature=False or "
                "vit_feature_source='final' for another count"
            )
        self.model_args = dict(
            args,
            **vit_args,
            trunk=trunk_name,
            pretrained_trunk=False,
            trunk_kwargs=dict(trunk_kwargs or {}),
            interaction_indexes=[list(r) for r in self.interaction_indexes],
            window_size=None if window_size is None else list(window_size),
        )
        self.in_chans = self.trunk.in_chans
        embed_dim = self.embed_dim = self.num_features = self.head_hidden_size = self.trunk.embed_dim
        self.num_classes = 0  # a feature backbone: forward_head only pools
        self.add_vit_feature = add_vit_feature
        self.vit_feature_source = vit_feature_source
        self.extractor_only = extractor_only
        self.freeze_trunk = freeze_trunk
        self.grad_checkpointing = False

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(embed_dim, conv_inplane, self.in_chans)
        self.interactions = nn.Sequential(*[
            InteractionBlock(
                embed_dim,
                num_heads=deform_num_heads,
                num_points=n_points,
                deform_ratio=deform_ratio,
                init_values=init_values,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                drop_path=drop_path_rate,
                extra_extractors=use_extra_extractor and i == len(self.interaction_indexes) - 1,
                with_injector=not extractor_only,
                norm_eps=adapter_norm_eps,
            )
            for i in range(len(self.interaction_indexes))
        ])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.norm2 = nn.BatchNorm2d(embed_dim)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.norm4 = nn.BatchNorm2d(embed_dim)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=stride, module=f"norm{i + 1}") for i, stride in enumerate(STRIDES)
        ]
        # the levels forward computes and returns; prune_intermediate_layers narrows it
        self.kept_levels: tuple[int, ...] = tuple(range(len(STRIDES)))
        self.init_adapter_weights()
        if freeze_trunk:
            self.vit.requires_grad_(False)
            self.vit.eval()

    def init_adapter_weights(self) -> None:
        """Upstream's initialisation of everything but the ViT: trunc-normal Linear, fan-out normal convs,
        unit norms, N(0, 1) level embedding, and the deformable attention's own reset last."""
        for part in (self.spm, self.interactions, self.up):
            part.apply(_init_adapter_module)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def train(self, mode: bool = True) -> "ViTAdapter":
        super().train(mode)
        if self.freeze_trunk:
            self.vit.eval()  # a frozen trunk keeps its eval-mode dropout and drop-path
        return self

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image (B, C, h, w) -> four (B, D, ceil(h/s), ceil(w/s)) maps for s = 4, 8, 16, 32.

        The maps are in ``torch.channels_last`` memory format (the layout they are computed in);
        use ``.reshape`` rather than ``.view`` on them, or ``.contiguous()`` for NCHW strides. An image
        of another floating dtype is cast to the model's; all four maps come back in the model's dtype,
        or in autocast's while it is on; an empty batch gives empty maps. In training, the zero padding up to a
        multiple of 32 counts toward the BatchNorm statistics, as the padding of upstream's data
        pipelines does. After ``prune_intermediate_layers`` (with ``prune_head``) only the kept levels come back.

        ``torch.fx`` traces it (``create_feature_extractor`` works): the input checks and the
        shape-dependent adapter body are single calls in the graph, the level norms
        (``norm1`` ... ``norm4``) are module calls.
        """
        image = _checked_image(x, self.in_chans, self.level_embed)
        levels = _adapter_levels(
            image, self.spm, self.trunk, self.interactions, self.up, self.level_embed, self._forward_settings()
        )
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        return [_fit_to_image(norms[i](levels[i]), image, STRIDES[i]) for i in self.kept_levels]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The coarsest level (stride 32, or the coarsest kept one after pruning): timm's "final
        feature map", what ``forward_intermediates`` returns first. ``model(x)`` gives all levels."""
        return self(x)[-1]

    def _forward_settings(self) -> dict[str, Any]:
        """Plain values the adapter body needs (constants in a ``torch.fx`` graph)."""
        return dict(
            interaction_indexes=self.interaction_indexes,
            extractor_only=self.extractor_only,
            freeze_trunk=self.freeze_trunk,
            add_vit_feature=self.add_vit_feature,
            vit_feature_source=self.vit_feature_source,
            grad_checkpointing=self.grad_checkpointing,
            finest_level=0 in self.kept_levels,
        )

    # ---- timm integration ------------------------------------------------------------------------

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """timm's feature API over the pyramid levels (index 0 = stride 4): the final map (what
        ``forward_features`` returns) and the levels ``indices`` picks.

        The levels come out of one pass, so ``stop_early`` saves nothing and ``norm`` has no extra
        norm to apply: each level already ends in its BatchNorm.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, _ = feature_take_indices(len(STRIDES), indices)
        pruned = sorted(set(take) - set(self.kept_levels))
        if pruned:
            raise ValueError(f"levels {pruned} were pruned (prune_intermediate_layers kept {list(self.kept_levels)})")
        levels = dict(zip(self.kept_levels, self(x)))
        final = levels[self.kept_levels[-1]]
        picked = [levels[i] for i in take]
        if output_fmt == "NHWC":
            final, picked = final.permute(0, 2, 3, 1), [level.permute(0, 2, 3, 1) for level in picked]
        return picked if intermediates_only else (final, picked)

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 4, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Keep only the levels ``indices`` picks (timm's meaning: an int n is the last n): the norms of
        the others go, and without the stride-4 level so do ``spm.fc1`` and ``up``, so every remaining
        parameter takes part in forward (DDP needs no ``find_unused_parameters``). ``model(x)`` then
        returns the kept levels only. Returns the kept indices. The trunk and the interactions feed
        every level, so nothing else can go.

        ``model(x)``'s list of levels is this model's head output: with ``prune_head=False`` it must
        stay as it is (timm's contract), and as every level's norm is part of it, nothing is pruned;
        the indices are only checked. ``prune_norm`` has no norm to act on: each level ends in its own."""
        take, _ = feature_take_indices(len(STRIDES), indices)
        kept = tuple(sorted(set(take)))
        gone = sorted(set(self.kept_levels) - set(kept))
        if set(kept) - set(self.kept_levels):
            raise ValueError(f"cannot keep levels {list(kept)}: only {list(self.kept_levels)} are left")
        if not prune_head:
            return list(take)
        for i in gone:
            setattr(self, f"norm{i + 1}", nn.Identity())
        if 0 in gone:
            self.spm.fc1 = nn.Identity()
            self.up = nn.Identity()
        self.kept_levels = kept
        return list(take)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head step for a model without a classifier: the final map averaged over space, (B, D)."""
        return x.mean((-2, -1))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int = 0, global_pool: Optional[str] = None) -> None:
        """A feature backbone has no classifier: 0 classes is a no-op, anything else an error."""
        if num_classes:
            raise ValueError(
                f"ViTAdapter is a feature backbone without a classifier: cannot reset it to {num_classes} classes; "
                "put a head on model(x) or forward_head(forward_features(x))"
            )

    def __prepare_scriptable__(self) -> "ViTAdapter":
        # torch.jit.script calls this first: say plainly what works instead of a type error from deep inside
        raise TypeError(
            "ViTAdapter does not support TorchScript (torch.jit.script, deprecated in recent PyTorch): use "
            "torch.compile, torch.export.export, or ONNX (vitadapter.integrations.onnx.export_onnx)"
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.trunk.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The trunk's own exemptions (position rows, cls/register tokens, bias tables) and level_embed."""
        names = {name for name, _ in self.named_parameters()}
        trunk_names = getattr(self.vit, "no_weight_decay", lambda: set())()
        exempt = {f"vit.{n}" for n in trunk_names if f"vit.{n}" in names}
        exempt |= {n for n in names if n.startswith("vit.") and n.endswith("relative_position_bias_table")}
        return exempt | {"level_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay as upstream fine-tunes: embeddings first, then each
        ViT block; the adapter (unmatched) lands in the last group with the full learning rate."""
        return dict(
            stem=r"^vit\.(?:pos_embed|patch_embed|cls_token|reg_token|rope|rel_pos_bias)",
            blocks=r"^vit\.blocks\.(\d+)" if coarse else [(r"^vit\.blocks\.(\d+)", None)],
        )


# ---- the forward's steps -----------------------------------------------------------------------
# Module-level functions that torch.fx records as single calls (``torch.fx.wrap``): they branch on
# values and sizes, which symbolic tracing cannot follow. Outside fx tracing they are plain calls.


@torch.fx.wrap
def _checked_image(x: torch.Tensor, in_chans: int, like: torch.Tensor) -> torch.Tensor:
    """The checked image batch, in the model's floating dtype (that of ``like``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ViTAdapter expects a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"ViTAdapter expects a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"ViTAdapter expects a floating-point image, got dtype {x.dtype}")
    if x.device.type == "meta" or like.device.type == "meta":
        raise ValueError("ViTAdapter cannot run on the meta device (it holds shapes, not values): "
                         "build or move the model to cpu or cuda, with an image there")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if min(x.shape[-2:]) < MIN_SIZE:
        raise ValueError(f"image must be at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[-2]}x{x.shape[-1]}")
    return x.to(like.dtype)


@torch.fx.wrap
def _adapter_levels(
    image: torch.Tensor,
    spm: SpatialPriorModule,
    trunk: nn.Module,
    interactions: nn.Sequential,
    up: nn.Module,
    level_embed: torch.Tensor,
    settings: Mapping[str, Any],
) -> list[Optional[torch.Tensor]]:
    """The four pyramid levels before their norms, at the padded size (a multiple of 32); the
    stride-4 one is ``None`` when ``settings["finest_level"]`` is off (pruned away)."""
    h, w = image.shape[-2:]
    padded_h, padded_w = _ceil_div(h, SIZE_DIVISOR) * SIZE_DIVISOR, _ceil_div(w, SIZE_DIVISOR) * SIZE_DIVISOR
    batch, dim = image.shape[0], level_embed.shape[-1]
    if not batch:
        return [
            image.new_zeros(0, dim, padded_h // s, padded_w // s).contiguous(memory_format=torch.channels_last)
            for s in STRIDES
        ]
    x = F.pad(image, (0, padded_w - w, 0, padded_h - h)).contiguous(memory_format=torch.channels_last)
    c1, *pyramid = spm(x, finest=settings["finest_level"])
    c_grids = [tuple(p.shape[-2:]) for p in pyramid]
    c = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[i] for i, p in enumerate(pyramid)], dim=1)
    c_points = _reference_points(c_grids, x)

    def maybe_checkpoint(fn, *args):
        if settings["grad_checkpointing"] and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    ranges = settings["interaction_indexes"]
    if settings["extractor_only"]:
        vit_maps, vit_grid = _trunk_outputs(trunk, x, ranges, settings["freeze_trunk"])
        for interaction, tokens in zip(interactions, vit_maps):
            c = maybe_checkpoint(interaction.extract, c, tokens, c_points, vit_grid, c_grids)
    else:
        tokens, prefix, vit_grid = trunk.embed(x)
        vit_points = _reference_points([vit_grid], x)
        vit_maps = []
        for interaction, (start, end) in zip(interactions, ranges):
            tokens = maybe_checkpoint(interaction.injector, tokens, c, vit_points, c_grids)
            tokens, prefix = trunk.run(tokens, prefix, start, end, vit_grid)
            c = maybe_checkpoint(interaction.extract, c, tokens, c_points, vit_grid, c_grids)
            vit_maps.append(tokens)

    c2, c3, c4 = [
        part.reshape(batch, gh, gw, dim).permute(0, 3, 1, 2)
        for part, (gh, gw) in zip(c.split([gh * gw for gh, gw in c_grids], dim=1), c_grids)
    ]
    # c2..c4 are views of c (saved for backward); c1 is the transposed conv's fresh output and
    # can take its sums in place, which saves two full-resolution buffers.
    c1 = None if c1 is None else up(c2).add_(c1)
    levels = [c1, c2, c3, c4]
    if settings["add_vit_feature"]:
        if settings["vit_feature_source"] == "final":
            vit_maps = vit_maps[-1:] * 4
        feats = [None if level is None else _vit_map(t, vit_grid, level.shape[-2:]) for t, level in zip(vit_maps, levels)]
        levels = [None if c1 is None else c1.add_(feats[0])] + [level + feat for level, feat in zip(levels[1:], feats[1:])]
    return levels


@torch.fx.wrap
def _fit_to_image(level: torch.Tensor, image: torch.Tensor, stride: int) -> torch.Tensor:
    """A level cropped to ``ceil(h / stride) x ceil(w / stride)`` of the (unpadded) image, in the
    levels' dtype."""
    h, w = image.shape[-2:]
    level = level[..., : _ceil_div(h, stride), : _ceil_div(w, stride)].to(_levels_dtype(image))
    # an empty crop keeps no strides of its own: give it the layout of the others
    return level if image.shape[0] else level.contiguous(memory_format=torch.channels_last)


def _trunk_outputs(
    trunk: nn.Module, x: torch.Tensor, ranges: Sequence[tuple[int, int]], frozen: bool
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Extractor-only: one trunk pass, each interaction's last block output through the final norm."""
    with torch.no_grad() if frozen else nullcontext():
        tokens, prefix, grid = trunk.embed(x)
        outputs, done = [], -1
        for _, end in ranges:
            tokens, prefix = trunk.run(tokens, prefix, done + 1, end, grid)
            outputs.append(trunk.final_norm(tokens))
            done = end
    return outputs, grid


def _vit_map(tokens: torch.Tensor, grid: tuple[int, int], size: torch.Size) -> torch.Tensor:
    """ViT tokens as a (channels-last) map, resized bilinearly to a pyramid level's exact size."""
    feat = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).permute(0, 3, 1, 2)
    # a symbolic size is resized even where it happens to match (the identity), as in the trunk
    if all(statically_known_true(a == b) for a, b in zip(feat.shape[-2:], size)):
        return feat
    return F.interpolate(feat, size=size, mode="bilinear", align_corners=False)


def _build_trunk(args: Mapping[str, Any]) -> tuple[nn.Module, Optional[str], dict[str, Any]]:
    """The trunk module, the timm name that rebuilds it (``None`` for upstream's own ViT) and the
    resolved shape arguments of upstream's ViT (empty for a timm trunk)."""
    trunk, trunk_kwargs = args["trunk"], dict(args["trunk_kwargs"] or {})
    shape = {k: args[k] for k in UPSTREAM_VIT_DEFAULTS}
    if trunk is None:
        if trunk_kwargs or args["pretrained_trunk"]:
            raise ValueError("trunk_kwargs and pretrained_trunk need a timm trunk: pass trunk=NAME")
        vit_args = {k: UPSTREAM_VIT_DEFAULTS[k] if v is None else v for k, v in shape.items()}
        if vit_args["patch_size"] != 16:
            raise ValueError(f"upstream's ViT has patch_size 16, got {vit_args['patch_size']}: pass a timm trunk for other patch sizes")
        vit = create_vit(
            **vit_args, drop_rate=args["drop_rate"], attn_drop_rate=args["attn_drop_rate"], drop_path_rate=args["drop_path_rate"]
        )
        return vit, None, vit_args
    in_chans = shape.pop("in_chans")  # timm's builders pass it to every model; it is the trunk's too
    given = sorted(k for k, v in shape.items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)} shape upstream's own ViT; with trunk= pass them in trunk_kwargs")
    if isinstance(trunk, str):
        # timm's standard rates, given to every family alike: each timm ViT family (VisionTransformer,
        # Beit, Eva) takes these names; drop_rate as in upstream's own ViT (after the position
        # embedding and the blocks' projections), there being no classifier to drop before
        rates = dict(drop_path_rate=args["drop_path_rate"], attn_drop_rate=args["attn_drop_rate"],
                     pos_drop_rate=args["drop_rate"], proj_drop_rate=args["drop_rate"])
        for name, rate in rates.items():
            if rate:
                trunk_kwargs.setdefault(name, rate)
        if in_chans is not None:
            trunk_kwargs.setdefault("in_chans", in_chans)
        module = create_trunk(trunk, pretrained=args["pretrained_trunk"], **trunk_kwargs)
        return module, trunk, {}
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"trunk must be a timm model name or a timm module, got {type(trunk).__name__}")
    if args["pretrained_trunk"]:
        raise ValueError("pretrained_trunk applies to a trunk given by name; a module keeps its own weights")
    if args["drop_rate"] or args["attn_drop_rate"]:
        raise ValueError("drop_rate and attn_drop_rate apply to a trunk given by name; a module keeps its own dropout")
    if in_chans is not None and in_chans != trunk.patch_embed.proj.in_channels:
        raise ValueError(f"in_chans {in_chans} differs from the trunk module's {trunk.patch_embed.proj.in_channels}")
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return trunk, cfg.get("architecture"), {}


def _drop_unused_parts(vit: nn.Module, keep_final_norm: bool) -> None:
    """The classifier parts of a timm trunk (and its final norm, which only the extractor-only design
    uses) become Identity: parameters outside the forward would stall DDP and never train."""
    for name in ("head", "head_drop", "fc_norm") + (() if keep_final_norm else ("norm",)):
        if isinstance(getattr(vit, name, None), nn.Module):
            setattr(vit, name, nn.Identity())
    if getattr(vit, "attn_pool", None) is not None:
        vit.attn_pool = None


def _interaction_ranges(indexes: Optional[Sequence[Any]], depth: int) -> list[tuple[int, int]]:
    """Inclusive (start, end) block ranges from ranges or from each interaction's last block."""
    if indexes is None:
        if depth < 4:
            raise ValueError(f"a depth-{depth} trunk does not split into 4 interactions: pass interaction_indexes")
        indexes = [round((k + 1) * depth / 4) - 1 for k in range(4)]
    if isinstance(indexes, (str, bytes)) or not isinstance(indexes, Sequence) or not indexes:
        raise ValueError(f"interaction_indexes must be a non-empty list of block ranges or block numbers, got {indexes!r}")
    ranges, previous_end = [], -1
    for item in indexes:
        if isinstance(item, int) and not isinstance(item, bool):
            start, end = previous_end + 1, item
        elif isinstance(item, Sequence) and item and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
            start, end = item[0], item[-1]
        else:
            raise ValueError(f"interaction_indexes entry {item!r} is neither a block number nor a [start, end] range")
        if not 0 <= start <= end < depth:
            raise ValueError(
                f"interaction_indexes {list(indexes)}: entry {item!r} is not a block range within 0..{depth - 1}"
            )
        ranges.append((int(start), int(end)))
        previous_end = end
    return ranges


def _init_adapter_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _ceil_div(size: int, divisor: int) -> int:
    """ceil(size / divisor) in integer arithmetic: exact, and a plain expression when ``size`` is
    symbolic (an export with dynamic height and width). Written without negative operands: ONNX
    integer division truncates, which floors only non-negative numbers."""
    return (size + divisor - 1) // divisor


def _levels_dtype(image: torch.Tensor) -> torch.dtype:
    """One dtype for all four levels (under autocast they leave their last ops in different ones):
    autocast's while it is on for the image's device, else the image's, which is the model's."""
    device = image.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else image.dtype


def _reference_points(grids: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """Pixel centres ((j + .5) / W, (i + .5) / H) of each grid, row-major, concatenated: (Q, 2)."""
    points, dtype = [], torch.promote_types(like.dtype, torch.float32)
    for h, w in grids:
        ys = (torch.arange(h, dtype=dtype, device=like.device) + 0.5) / h
        xs = (torch.arange(w, dtype=dtype, device=like.device) + 0.5) / w
        points.append(torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2))
    return torch.cat(points)


# ---- registry ------------------------------------------------------------------------------------


def _create_vit_adapter(variant: str, pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    # Weights are loaded by models.checkpoints rather than timm's loader: upstream files need a restricted
    # unpickler, .zip unpacking and key conversion. Loading happens inside the constructor callable so
    # that it precedes timm's features_only wrapping.
    cache_dir, timeout = kwargs.pop("cache_dir", None), kwargs.pop("timeout", None)
    _check_timm_only_args(kwargs)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), overlay)
    sourceless = not any(getattr(cfg, k, None) for k in ("url", "hf_hub_id", "file", "state_dict"))
    if pretrained and sourceless and isinstance(kwargs.get("trunk"), str):
        # nothing of the adapter's own to load: the trunk's timm weights, through timm
        kwargs["pretrained_trunk"], pretrained = True, False

    def build(device: Any = None, dtype: Optional[torch.dtype] = None, **model_kwargs: Any) -> ViTAdapter:
        # timm passes device and dtype to every constructor; the weights load first, then move
        model = ViTAdapter(**model_kwargs)
        if pretrained:
            load_pretrained(model, cfg.to_dict(), cache_dir=cache_dir, timeout=timeout)
        return model if device is None and dtype is None else model.to(device=device, dtype=dtype)

    return build_model_with_cfg(
        build,
        variant,
        False,
        pretrained_cfg=cfg,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _check_timm_only_args(kwargs: dict[str, Any]) -> None:
    """timm's standard arguments that have no ViT-Adapter counterpart (taken out of ``kwargs``): the
    values that mean what the model does anyway are accepted, others refused with the reason."""
    output_stride = kwargs.pop("output_stride", None)  # smp and timm pass it to backbones
    if output_stride not in (None, 32):
        raise ValueError(
            f"output_stride={output_stride!r} is not supported: ViT-Adapter has no dilation, its levels have "
            "strides 4, 8, 16 and 32 (output_stride 32)"
        )
    global_pool = kwargs.pop("global_pool", None)
    if global_pool not in (None, "avg"):
        raise ValueError(f"global_pool={global_pool!r} is not supported: forward_head averages the final map ('avg')")


_UPSTREAM_REPO = "https://github.com/czczup/ViT-Adapter"
_RELEASES = f"{_UPSTREAM_REPO}/releases/download"
# AugReg trunks were trained on [-1, 1] inputs; timm and upstream's AugReg-B/L configs normalise so.
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "input_size": (3, 512, 512),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": ("vit.patch_embed.proj", "spm.stem.0"),
        "classifier": "",
        "num_classes": 0,
        "license": "apache-2.0",
        **kwargs,
    }


def _trunk(hf_hub_id: str, **kwargs: Any) -> dict[str, Any]:
    """ImageNet ViT weights from a timm Hub repo, with a fresh adapter (what upstream trains from)."""
    return _cfg(hf_hub_id=hf_hub_id, origin_url=f"https://huggingface.co/{hf_hub_id}", **kwargs)


def _upstream(file: str, config: str, metric: str, **kwargs: Any) -> dict[str, Any]:
    """The backbone of an upstream dense checkpoint (GitHub release), converted on load, heads dropped."""
    return _cfg(
        url=f"{_RELEASES}/{file}",
        origin_url=_UPSTREAM_REPO,
        notes=(f"upstream config {config}", f"upstream reports {metric}"),
        **kwargs,
    )


# The first tag of each architecture is its default: the ImageNet trunk upstream's configs start
# from (upstream's own `pretrained=`). Dense-task backbones are opt-in tags; links are copied from
# upstream's segmentation/README.md and detection/README.md, configs from upstream's configs/.
default_cfgs = generate_default_cfgs({
    # any timm ViT: ``trunk=NAME`` (pretrained=True loads the trunk's timm weights) or ``trunk=MODULE``
    "vit_adapter": _cfg(),
    "vit_adapter_t.deit_in1k": _trunk("timm/deit_tiny_patch16_224.fb_in1k"),
    "vit_adapter_t.augreg_in21k_ft_in1k": _trunk("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", **_HALF),
    # Same release naming ("..._160_ade20k") as the DeiT-T file that is reported dead (upstream
    # issues #146, #197); this one is unconfirmed. The config normalises with ImageNet mean/std.
    "vit_adapter_t.augreg_upernet_ade20k": _upstream(
        "v0.3.1/upernet_augreg_adapter_tiny_512_160_ade20k.pth.tar",
        "segmentation/configs/ade20k/upernet_augreg_adapter_tiny_512_160k_ade20k.py",
        "ADE20K val mIoU 43.9 (SS) / 44.8 (MS), UperNet 160k",
    ),
    "vit_adapter_s.deit_in1k": _trunk("timm/deit_small_patch16_224.fb_in1k"),
    "vit_adapter_s.deit_upernet_ade20k": _upstream(
        "v0.3.1/upernet_deit_adapter_small_512_160k_ade20k.pth",
        "segmentation/configs/ade20k/upernet_deit_adapter_small_512_160k_ade20k.py",
        "ADE20K val mIoU 46.2 (SS) / 47.1 (MS), UperNet 160k",
    ),
    "vit_adapter_b.deit_in1k": _trunk("timm/deit_base_patch16_224.fb_in1k"),
    "vit_adapter_b.deit_upernet_ade20k": _upstream(
        "v0.3.1/upernet_deit_adapter_base_512_160k_ade20k.pth.tar",
        "segmentation/configs/ade20k/upernet_deit_adapter_base_512_160k_ade20k.py",
        "ADE20K val mIoU 48.8 (SS) / 49.7 (MS), UperNet 160k",
    ),
    "vit_adapter_b_384.augreg_in21k_ft_in1k": _trunk("timm/vit_base_patch16_384.augreg_in21k_ft_in1k", **_HALF),
    "vit_adapter_b_384.augreg_upernet_ade20k": _upstream(
        "v0.3.1/upernet_augreg_adapter_base_512_160k_ade20k.pth.tar",
        "segmentation/configs/ade20k/upernet_augreg_adapter_base_512_160k_ade20k.py",
        "ADE20K val mIoU 51.9 (SS) / 52.5 (MS), UperNet 160k",
        **_HALF,
    ),
    "vit_adapter_l.augreg_in21k_ft_in1k": _trunk("timm/vit_large_patch16_384.augreg_in21k_ft_in1k", **_HALF),
    "vit_adapter_l.augreg_upernet_ade20k": _upstream(
        "v0.3.1/upernet_augreg_adapter_large_512_160k_ade20k.pth.tar",
        "segmentation/configs/ade20k/upernet_augreg_adapter_large_512_160k_ade20k.py",
        "ADE20K val mIoU 53.4 (SS) / 54.4 (MS), UperNet 160k",
        **_HALF,
    ),
    "vit_adapter_t_det.deit_in1k": _trunk("timm/deit_tiny_patch16_224.fb_in1k"),
    "vit_adapter_t_det.deit_mask_rcnn_coco": _upstream(
        "v0.1.2/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.pth.tar",
        "detection/configs/mask_rcnn/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.py",
        "COCO val box AP 46.0 / mask AP 41.0, Mask R-CNN 3x+MS",
    ),
    "vit_adapter_s_det.deit_in1k": _trunk("timm/deit_small_patch16_224.fb_in1k"),
    "vit_adapter_s_det.deit_mask_rcnn_coco": _upstream(
        "v0.1.2/mask_rcnn_deit_adapter_small_fpn_3x_coco.pth.tar",
        "detection/configs/mask_rcnn/mask_rcnn_deit_adapter_small_fpn_3x_coco.py",
        "COCO val box AP 48.2 / mask AP 42.8, Mask R-CNN 3x+MS",
    ),
    "vit_adapter_s_det.deit_cascade_mask_rcnn_coco": _upstream(
        "v0.1.3/cascade_mask_rcnn_deit_adapter_small_fpn_3x_coco.pth.tar",
        "detection/configs/cascade_rcnn/cascade_mask_rcnn_deit_adapter_small_fpn_3x_coco.py",
        "COCO val box AP 51.5 / mask AP 44.3, Cascade Mask R-CNN 3x+MS",
    ),
    "vit_adapter_b_det.deit_in1k": _trunk("timm/deit_base_patch16_224.fb_in1k"),
    "vit_adapter_b_det.deit_mask_rcnn_coco": _upstream(
        "v0.1.6/mask_rcnn_deit_adapter_base_fpn_3x_coco.pth.tar",
        "detection/configs/mask_rcnn/mask_rcnn_deit_adapter_base_fpn_3x_coco.py",
        "COCO val box AP 49.6 / mask AP 43.6, Mask R-CNN 3x+MS",
    ),
    "vit_adapter_b_det.deit_cascade_mask_rcnn_coco": _upstream(
        "v0.3.1/cascade_mask_rcnn_deit_adapter_base_fpn_3x_coco.pth",
        "detection/configs/cascade_rcnn/cascade_mask_rcnn_deit_adapter_base_fpn_3x_coco.py",
        "COCO val box AP 52.1 / mask AP 44.8, Cascade Mask R-CNN 3x+MS",
    ),
    "vit_adapter_l_det.augreg_in21k_ft_in1k": _trunk("timm/vit_large_patch16_384.augreg_in21k_ft_in1k", **_HALF),
    "vit_adapter_l_det.augreg_mask_rcnn_coco": _upstream(
        "v0.3.1/mask_rcnn_augreg_adapter_large_fpn_3x_coco.pth",
        "detection/configs/mask_rcnn/mask_rcnn_augreg_adapter_large_fpn_3x_coco.py",
        "COCO val box AP 52.1 / mask AP 46.0, Mask R-CNN 3x+MS",
        **_HALF,
    ),
    # unlike its Mask R-CNN, upstream's AugReg-L HTC++ trains and tests with ImageNet's mean and std
    "vit_adapter_l_det.augreg_htc_coco": _upstream(
        "v0.3.1/htc++_augreg_adapter_large_fpn_3x_coco.pth",
        "detection/configs/htc++/htc++_augreg_adapter_large_fpn_3x_coco.py",
        "COCO val box AP 56.6 / mask AP 49.0, HTC++ 3x+MS",
    ),
})

_T = dict(embed_dim=192, depth=12, num_heads=3, deform_num_heads=6, deform_ratio=1.0)
_S = dict(embed_dim=384, depth=12, num_heads=6, deform_num_heads=6, deform_ratio=1.0)
_B = dict(embed_dim=768, depth=12, num_heads=12, deform_num_heads=12, deform_ratio=0.5)
_L = dict(embed_dim=1024, depth=24, num_heads=16, deform_num_heads=16, deform_ratio=0.5, pretrain_size=384)
_SIZES = {"t": _T, "s": _S, "b": _B, "l": _L}


# model_args that change training only: a configuration that differs in these is still its architecture
_TRAINING_ONLY = ("drop_rate", "attn_drop_rate", "drop_path_rate", "freeze_trunk", "pretrained_trunk")


def closest_architecture(model_args: Mapping[str, Any]) -> str:
    """The registered architecture ``model_args`` is an instance of (training-only rates aside), else
    the generic ``vit_adapter``, which rebuilds any configuration from its model_args. A config.json
    for a model built outside the registry (e.g. by load_upstream) names it."""
    if model_args.get("trunk") is None:
        wanted = {k: v for k, v in model_args.items() if k not in _TRAINING_ONLY}
        for arch in timm.list_models(module=__name__.rsplit(".", 1)[-1]):
            if arch == "vit_adapter":
                continue
            if wanted == _registered_args(arch):
                return arch
    return "vit_adapter"


@functools.lru_cache(maxsize=None)
def _registered_args(arch: str) -> dict[str, Any]:
    """A registered architecture's model_args, training-only rates aside: built once on the meta
    device (every save_pretrained asks; building them all each time took seconds)."""
    with meta_device():
        registered = globals()[arch]().model_args
    return {k: v for k, v in registered.items() if k not in _TRAINING_ONLY}


def _detection(depth: int) -> dict[str, Any]:
    """Upstream's detection flavour: final ViT feature on every level, 14x14 windows except the last
    block of each interaction group, as upstream's detection configs."""
    group = depth // 4
    windows = ([14] * (group - 1) + [None]) * 4
    return dict(vit_feature_source="final", window_size=windows)


@register_model
def vit_adapter(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter on any timm ViT: ``trunk`` is a timm name (``pretrained`` loads its timm weights
    and the adapter starts fresh) or a timm module; every ``ViTAdapter`` option applies. Without a
    trunk, upstream's own ViT of the given ``embed_dim``, ``depth`` and ``num_heads`` (what saved
    custom upstream configurations rebuild through)."""
    if kwargs.get("trunk") is None and not {"embed_dim", "depth", "num_heads"} <= set(kwargs):
        raise ValueError(
            "vit_adapter needs trunk=: a timm ViT name (e.g. 'vit_base_patch14_dinov2.lvd142m') or module "
            "(or embed_dim, depth and num_heads for upstream's own ViT)"
        )
    return _create_vit_adapter("vit_adapter", pretrained, **kwargs)


@register_model
def vit_adapter_t(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-T: DeiT-Tiny trunk, segmentation forward (upstream's released configuration)."""
    args = dict(_T, drop_path_rate=0.1)
    return _create_vit_adapter("vit_adapter_t", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_s(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-S: DeiT-Small trunk, segmentation forward (upstream's released configuration)."""
    args = dict(_S, drop_path_rate=0.2)
    return _create_vit_adapter("vit_adapter_s", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_b(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B: DeiT-Base trunk, 224-px position grid, segmentation forward (upstream's released configuration)."""
    args = dict(_B, drop_path_rate=0.3)
    return _create_vit_adapter("vit_adapter_b", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_b_384(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B on an AugReg ViT-B/16: 384-px position grid, segmentation forward."""
    args = dict(_B, drop_path_rate=0.3, pretrain_size=384)
    return _create_vit_adapter("vit_adapter_b_384", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_l(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L: ViT-L/16 trunk (AugReg), 384-px position grid, segmentation forward (upstream's released configuration)."""
    args = dict(_L, drop_path_rate=0.4)
    return _create_vit_adapter("vit_adapter_l", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_t_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-T, detection forward with windowed attention (upstream's Mask R-CNN configs)."""
    args = dict(_T, drop_path_rate=0.1, **_detection(12))
    return _create_vit_adapter("vit_adapter_t_det", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_s_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-S, detection forward with windowed attention (upstream's Mask R-CNN configs)."""
    args = dict(_S, drop_path_rate=0.2, **_detection(12))
    return _create_vit_adapter("vit_adapter_s_det", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_b_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B, detection forward with windowed attention (upstream's Mask R-CNN configs)."""
    args = dict(_B, drop_path_rate=0.2, **_detection(12))
    return _create_vit_adapter("vit_adapter_b_det", pretrained, **dict(args, **kwargs))


@register_model
def vit_adapter_l_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L, detection forward with windowed attention, 384-px position grid."""
    args = dict(_L, drop_path_rate=0.4, **_detection(24))
    return _create_vit_adapter("vit_adapter_l_det", pretrained, **dict(args, **kwargs))
