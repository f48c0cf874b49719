"""3DETR (Misra et al. 2021) on pkd's pre-trained encoder: the detection model of the paper's Table 1.

The paper (appendix A.2, "Object Detection") fixes: 3DETR with its ScanNet settings, 2048 points after the
pre-encoder, 256 non-parametric queries with Fourier positional embeddings, the pre-trained 12-block 384-wide
encoder, an 8-layer decoder of width 256. Everything else follows facebookresearch/3detr (file named per item)
and, for plugging a pre-trained Point-MAE-style encoder into 3DETR, MaskPoint's fork
(WisconsinAIVision/3detr_MaskPoint ``main.py``, WisconsinAIVision/MaskPoint ``models/MaskPoint.py``):

* Pre-encoder (``models/model_3detr.py`` ``build_preencoder``; ``third_party/pointnet2/pointnet2_modules.py``
  ``PointnetSAModuleVotes``): FPS of the input cloud to ``preenc_points`` (2048) centres, a ball query of
  radius 0.2 taking the first 64 points in index order (padded with the first one found, as pointnet2's CUDA
  ``ball_query``), offsets to the centre divided by the radius (``normalize_xyz=True``) and concatenated with
  any point features (``use_xyz``), then a shared point MLP and a max over the 64 samples. ``preencoder``
  chooses the point MLP: ``"pointmae"`` (default) is the pre-trained mini-PointNet ``MAE_encoder.encoder``, as
  MaskPoint maps its pre-trained tokenizer onto 3DETR's ``pre_encoder``; ``"3detr"`` is 3DETR's own
  ``SharedMLP`` [3 + C, 64, 128, dim] (1×1 conv without bias, BatchNorm, ReLU after every layer;
  ``third_party/pointnet2/pytorch_utils.py``), freshly initialised, the only one that takes colour/height.
* Encoder (MaskPoint ``models/MaskPoint.py`` with ``enc_arch: 3detr``): the 2048 pre-encoder tokens go through
  the pre-trained blocks with ``pos_embed`` of the raw token centres added to every block's input (pkd's
  ``TransformerEncoder``), then the encoder's final LayerNorm (MaskPoint's 3DETR encoder has
  ``norm=LayerNorm``).
* Encoder → decoder projection (``model_3detr.py`` ``encoder_to_decoder_projection``): 1×1 convs
  dim → dim → dim → 256 with BatchNorm and ReLU after each (the last without bias); this is the 384 → 256 step.
* Queries (``get_query_embeddings``): FPS of the 2048 encoder points to ``num_queries`` (256); their Fourier
  embedding (``models/position_embedding.py`` ``PositionEmbeddingCoordsSine``, ``pos_type="fourier"``,
  ``normalize=True``: coordinates scaled to [0, 1] by the cloud's min/max, times 2π, times a fixed N(0, 1)
  3 × 128 matrix, [sin, cos]) through ``query_projection`` (256 → 256 → 256, ReLU after both, biases). The
  encoder points get the same Fourier embedding as keys' positions.
* Decoder (``models/transformer.py`` ``TransformerDecoderLayer.forward_pre``, ``TransformerDecoder``):
  ``dec_layers`` pre-norm layers (self-attention on queries, cross-attention to the encoder tokens, ReLU FFN;
  query positions added to queries and keys, encoder positions to keys), zero initial targets, dropout 0.1 on
  residuals, FFN and attention weights, a shared final LayerNorm applied to every layer's output
  (``return_intermediate=True``), Xavier-uniform initialisation of every matrix.
* Heads (``build_mlp_heads``, ``get_box_predictions``, ``BoxProcessor``): five MLPs 256 → 256 → 256 → out
  (BatchNorm, ReLU, dropout ``mlp_dropout`` 0.3) for semantic class + no-object, centre offset
  (sigmoid − 0.5, added to the query position), size (sigmoid, times the cloud's extent clamped at 0.1),
  angle class and angle residual (× π / num_angle_bin). ScanNet boxes are axis-aligned: num_angle_bin 1 and
  a zero angle (``datasets/scannet.py`` ``ScannetDatasetConfig``), whose heads still run so every parameter
  gets a gradient, as 3DETR. For the metric every layer also gives ``boxes`` (B, Q, 6) = [min xyz, max xyz].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pkd.common.errors import ConfigError
from pkd.train.encoder import EncoderConfig, PointEncoder
from pkd.train.tokenizer import farthest_point_sample, gather_points

PREENCODERS = ("pointmae", "3detr")
BALL_QUERY_CHUNK = 2**24  # distance-matrix entries per ball-query chunk (64 MiB of float32)


@torch.no_grad()
def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """Indices (B, S, nsample) of the first ``nsample`` points (in index order) within ``radius`` of each
    centre, padded with the first one found: pointnet2's ``ball_query``. A centre that is itself one of the
    points always finds itself; one with no point in reach gets index 0, as the CUDA kernel."""
    batch, num_points, _ = xyz.shape
    order = torch.arange(num_points, device=xyz.device, dtype=torch.float32)
    chunk = max(1, BALL_QUERY_CHUNK // max(1, batch * num_points))
    out = []
    for start in range(0, centres.shape[1], chunk):
        dist = torch.cdist(centres[:, start : start + chunk].float(), xyz.float())
        key = torch.where(dist < radius, order, float(num_points))
        if nsample > num_points:
            key = torch.cat([key, key.new_full((*key.shape[:2], nsample - num_points), num_points)], dim=-1)
        first = key.topk(nsample, dim=-1, largest=False, sorted=True).values
        first = torch.where(first >= num_points, first[..., :1], first)
        out.append(torch.where(first >= num_points, 0.0, first).long())
    return torch.cat(out, dim=1)


class BallGroup(nn.Module):
    """3DETR's pre-encoder grouping: FPS centres, ball-query neighbourhoods, offsets / radius ⊕ features.

    (B, N, 3) points and optional (B, N, C) features → groups (B, S, k, 3 + C), centres (B, S, 3), centre
    indices (B, S)."""

    def __init__(self, npoint: int, radius: float, nsample: int) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample

    def forward(
        self, xyz: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        centre_idx = farthest_point_sample(xyz, self.npoint)
        centres = gather_points(xyz, centre_idx)
        idx = ball_query(xyz, centres, self.radius, self.nsample)
        groups = (gather_points(xyz, idx) - centres.unsqueeze(2)) / self.radius
        if features is not None:
            groups = torch.cat([groups, gather_points(features, idx)], dim=-1)
        return groups, centres, centre_idx


class ChannelNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last axis of (..., C): the statistics of a 1×1 conv's BatchNorm on (N, C, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def mlp(
    dims: list[int],
    norm: bool = True,
    dropout: float = 0.0,
    last_bias: bool = True,
    last_norm: bool = False,
    last_act: bool = False,
    hidden_bias: bool = False,
) -> nn.Sequential:
    """3DETR's ``GenericMLP`` (``models/helpers.py``) on channels-last tensors: Linear (= 1×1 conv),
    [BatchNorm], ReLU, [Dropout] per hidden layer, then the output layer with optional BatchNorm/ReLU."""
    layers: list[nn.Module] = []
    for cin, cout in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(cin, cout, bias=hidden_bias)] + ([ChannelNorm(cout)] if norm else []) + [nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    layers += [ChannelNorm(dims[-1])] if last_norm else []
    layers += [nn.ReLU()] if last_act else []
    return nn.Sequential(*layers)


class SharedMLP(nn.Module):
    """3DETR's pre-encoder point MLP (pointnet2 ``SharedMLP``, every layer conv-BN-ReLU) + max over samples:
    groups (B, S, k, C_in) → tokens (B, S, C_out)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(cin, cout, bias=False), ChannelNorm(cout), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        return self.layers(groups).max(dim=2).values


def shift_scale(xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor) -> torch.Tensor:
    """(B, P, 3) coordinates mapped to [0, 1] by per-cloud (B, 3) min/max (3DETR ``utils/pc_util.py``)."""
    return (xyz - dims_min[:, None]) / (dims_max - dims_min)[:, None]


class FourierEmbedding(nn.Module):
    """3DETR's ``PositionEmbeddingCoordsSine(pos_type="fourier", normalize=True)``: (B, P, 3) → (B, P, d).

    Computed in float32 outside autocast (3DETR runs it under ``no_grad`` in fp32): bf16 would lose the
    phase of 2π·x·B."""

    gauss_B: torch.Tensor

    def __init__(self, dim: int, gauss_scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"the Fourier embedding needs an even width; got dec_dim {dim}.")
        self.register_buffer("gauss_B", torch.empty(3, dim // 2).normal_() * gauss_scale)

    @torch.no_grad()
    def forward(self, xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xyz.device.type, enabled=False):
            proj = shift_scale(xyz.float(), dims_min.float(), dims_max.float()) * (2 * math.pi) @ self.gauss_B
            return torch.cat([proj.sin(), proj.cos()], dim=-1)


class DecoderLayer(nn.Module):
    """3DETR's pre-norm ``TransformerDecoderLayer`` (``forward_pre``), batch-first."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        x = self.norm1(tgt)
        q = x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norm2(tgt)
        tgt = tgt + self.dropout(self.multihead_attn(x + query_pos, memory + pos, memory, need_weights=False)[0])
        x = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout(x)


class Decoder(nn.Module):
    """3DETR's ``TransformerDecoder(return_intermediate=True)``: every layer's output through the final norm."""

    def __init__(self, layers: int, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        xavier_init(self)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """(L, B, Q, C) outputs of the L layers."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


def xavier_init(module: nn.Module) -> None:
    """3DETR's transformer initialisation (``weight_init_name="xavier_uniform"``): every matrix."""
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


class DetectionHead(nn.Module):
    """3DETR after its encoder: projection, FPS queries, decoder, box heads, per-layer box predictions."""

    def __init__(
        self,
        enc_dim: int,
        num_classes: int = 18,
        num_queries: int = 256,
        dec_layers: int = 8,
        dec_dim: int = 256,
        dec_heads: int = 4,
        dec_ffn: int = 256,
        dropout: float = 0.1,
        mlp_dropout: float = 0.3,
        num_angle_bin: int = 1,
    ) -> None:
        super().__init__()
        self.num_queries, self.num_angle_bin = num_queries, num_angle_bin
        self.encoder_to_decoder_projection = mlp(
            [enc_dim, enc_dim, enc_dim, dec_dim], last_bias=False, last_norm=True, last_act=True
        )
        self.pos_embedding = FourierEmbedding(dec_dim)
        self.query_projection = mlp([dec_dim, dec_dim, dec_dim], norm=False, last_act=True, hidden_bias=True)
        self.decoder = Decoder(dec_layers, dec_dim, dec_heads, dec_ffn, dropout)
        sizes = {
            "sem_cls_head": num_classes + 1,
            "center_head": 3,
            "size_head": 3,
            "angle_cls_head": num_angle_bin,
            "angle_residual_head": num_angle_bin,
        }
        self.mlp_heads = nn.ModuleDict(
            {name: mlp([dec_dim, dec_dim, dec_dim, out], dropout=mlp_dropout) for name, out in sizes.items()}
        )

    def forward(
        self, enc_xyz: torch.Tensor, enc_features: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor
    ) -> dict:
        """Encoder points (B, S, 3) and features (B, S, enc_dim) → ``{"outputs": last layer's predictions,
        "aux_outputs": [the earlier layers' predictions]}`` (3DETR's ``Model3DETR.forward``)."""
        if self.num_queries > enc_xyz.shape[1]:
            raise ConfigError(
                f"num_queries {self.num_queries} exceeds the {enc_xyz.shape[1]} encoder points; "
                "lower num_queries or raise preenc_points."
            )
        memory = self.encoder_to_decoder_projection(enc_features)
        query_xyz = gather_points(enc_xyz, farthest_point_sample(enc_xyz, self.num_queries))
        query_pos = self.query_projection(self.pos_embedding(query_xyz, dims_min, dims_max).to(memory.dtype))
        pos = self.pos_embedding(enc_xyz, dims_min, dims_max).to(memory.dtype)
        features = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos)
        layers = self.box_predictions(query_xyz, dims_min, dims_max, features)
        return {"outputs": layers[-1], "aux_outputs": layers[:-1]}

    def box_predictions(
        self, query_xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor, features: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """3DETR's ``get_box_predictions``: the heads on every layer's (L, B, Q, C) features (one batch, so
        BatchNorm sees all layers together as there), then ``BoxProcessor`` per layer."""
        heads = {name: head(features).float() for name, head in self.mlp_heads.items()}
        center_offset = heads["center_head"].sigmoid() - 0.5
        size_normalized = heads["size_head"].sigmoid()
        angle_residual_normalized = heads["angle_residual_head"]
        angle_residual = angle_residual_normalized * (math.pi / self.num_angle_bin)
        scene_scale = (dims_max - dims_min).clamp(min=0.1)[:, None]
        outputs = []
        for i in range(features.shape[0]):
            cls_logits, angle_logits = heads["sem_cls_head"][i], heads["angle_cls_head"][i]
            center = query_xyz + center_offset[i]
            size = size_normalized[i] * scene_scale
            with torch.no_grad():
                cls_prob = cls_logits.softmax(dim=-1)
            outputs.append(
                {
                    "sem_cls_logits": cls_logits,
                    "center_normalized": shift_scale(center, dims_min, dims_max),
                    "center_unnormalized": center,
                    "size_normalized": size_normalized[i],
                    "size_unnormalized": size,
                    "angle_logits": angle_logits,
                    "angle_residual": angle_residual[i],
                    "angle_residual_normalized": angle_residual_normalized[i],
                    "angle_continuous": self.angle(angle_logits, angle_residual[i]),
                    "objectness_prob": 1 - cls_prob[..., -1],
                    "sem_cls_prob": cls_prob[..., :-1],
                    "boxes": torch.cat([center - size / 2, center + size / 2], dim=-1),
                }
            )
        return outputs

    def angle(self, logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``BoxProcessor.compute_predicted_angle``: zero for one bin (outputs kept in the graph), else the
        arg-max bin's centre plus its residual, wrapped to (−π, π]."""
        if logits.shape[-1] == 1:
            return (logits * 0 + residual * 0).squeeze(-1).clamp(min=0)
        bin_idx = logits.argmax(dim=-1, keepdim=True).detach()
        angle = (2 * math.pi / self.num_angle_bin) * bin_idx.squeeze(-1) + residual.gather(-1, bin_idx).squeeze(-1)
        return torch.where(angle > math.pi, angle - 2 * math.pi, angle)


class Detector(nn.Module):
    """3DETR with pkd's pre-trained ``PointEncoder`` (``MAE_encoder``, loadable by ``init_encoder``) as its
    encoder: points (B, N, 3 + C) → per-decoder-layer box predictions (see ``DetectionHead.forward``)."""

    def __init__(
        self,
        encoder: EncoderConfig,
        num_classes: int = 18,
        num_queries: int = 256,
        preenc_points: int = 2048,
        preenc_radius: float = 0.2,
        preenc_samples: int = 64,
        preencoder: str = "pointmae",
        in_features: int = 0,
        dec_layers: int = 8,
        dec_dim: int = 256,
        dec_heads: int = 4,
        dec_ffn: int = 256,
        dropout: float = 0.1,
        mlp_dropout: float = 0.3,
        num_angle_bin: int = 1,
    ) -> None:
        super().__init__()
        if preencoder not in PREENCODERS:
            raise ConfigError(f"preencoder {preencoder!r} is not one of {', '.join(PREENCODERS)}.")
        if preencoder == "pointmae" and in_features:
            raise ConfigError(
                "the pre-trained mini-PointNet pre-encoder reads xyz only; turn colour/height off or use "
                "preencoder '3detr'."
            )
        self.in_features = in_features
        self.group = BallGroup(preenc_points, preenc_radius, preenc_samples)
        self.MAE_encoder = PointEncoder.from_config(encoder)
        self.pre_encoder = SharedMLP([3 + in_features, 64, 128, encoder.dim]) if preencoder == "3detr" else None
        self.head = DetectionHead(
            encoder.dim,
            num_classes,
            num_queries,
            dec_layers,
            dec_dim,
            dec_heads,
            dec_ffn,
            dropout,
            mlp_dropout,
            num_angle_bin,
        )

    def forward(self, points: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor) -> dict:
        """points (B, N, 3 + in_features); dims_min/dims_max (B, 3) the cloud's min/max xyz."""
        tokens, centres = self.preencode(points)
        enc = self.MAE_encoder
        features = enc.norm(enc.blocks(tokens, enc.pos_embed(centres))[-1])
        return self.head(centres, features, dims_min, dims_max)

    def preencode(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-encoder tokens (B, S, dim) and their centres (B, S, 3)."""
        if points.shape[-1] != 3 + self.in_features:
            raise ConfigError(
                f"the detector was built for {3 + self.in_features} point channels, got {points.shape[-1]}."
            )
        xyz = points[..., :3].contiguous()
        groups, centres, _ = self.group(xyz, points[..., 3:] if self.in_features else None)
        pointnet = self.pre_encoder if self.pre_encoder is not None else self.MAE_encoder.encoder
        return pointnet(groups), centres
