"""Mask R-CNN for small, dense nuclei, with Gong et al.'s additions (WACV 2021): a semantic segmentation branch on
the shared backbone, and focal loss for box classification and masks.

The network is torchvision's :class:`~torchvision.models.detection.MaskRCNN` with

- a compact backbone that trains on a CPU: a ResNet (``resnet18`` by default; BatchNorm, all stages trainable,
  since it starts from scratch) under a feature pyramid P2-P5 (+ P6 by max-pooling) of ``fpn_channels`` channels;
- anchors for nuclei: one size per pyramid level, 8 px on P2 (stride 4) to 128 px on P6, aspect ratios 0.5, 1 and 2;
  RPN and RoI sampling raised for tiles of hundreds of nuclei, and up to ``box_detections_per_img`` (2,000)
  detections per tile;
- no rescaling: images run at their own resolution (the magnification fixes the scale of nuclei; torchvision would
  otherwise resize every image to ``min_size``). Sizes that are not multiples of 32 are padded by torchvision;
- a **semantic branch** (Panoptic FPN's head, Kirillov et al. 2019): each of P2..P5 goes through 3 x 3 conv +
  GroupNorm + ReLU (+ 2x upsampling) stages until it reaches 1/4 resolution, the four are summed, a 1 x 1 conv
  predicts background/nucleus at 1/4 resolution and bilinear upsampling brings it to the input. Trained with
  cross-entropy against the labels' foreground, weighted by ``semantic_weight``; at inference it gives a nucleus
  probability map that vetoes detections lying mostly outside the predicted foreground;
- **focal loss** (Lin et al. 2017), ``FL = -(1 - p_t)^gamma log p_t`` with ``gamma = focal_gamma``, replacing
  the cross-entropy of the box classifier (softmax over classes, mean over the sampled RoIs) and the binary
  cross-entropy of the mask head (per mask pixel, mean). At ``gamma = 0`` both are exactly torchvision's losses.
  The RPN keeps torchvision's losses. The focal losses live in :class:`FocalRoIHeads`, a subclass of torchvision's
  ``RoIHeads`` used by this model only: torchvision's module-level ``fastrcnn_loss``/``maskrcnn_loss`` are never
  patched.

Training batches (:func:`collate`) hold lists of per-image targets, since images hold different numbers of nuclei;
the training loop (:mod:`napari_nucsynth.train`) calls ``SPEC.collate``. ImageNet weights cannot be downloaded here:
``config["pretrained"]`` may name a local torchvision ResNet state dict file (BatchNorm or frozen norm only);
otherwise the backbone starts from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    paste_masks_in_image,
    project_masks_on_boxes,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from .._checks import as_labels, as_rgb
from . import ModelSpec, register_model

__all__ = [
    "SPEC", "DetectionCache", "FocalRoIHeads", "NucleiMaskRCNN", "SemanticHead", "build", "collate", "default_config", "detect",
    "focal_bce_with_logits", "focal_cross_entropy", "instances_from_detections", "loss", "predict", "targets",
]

#: Nuclei smaller than this (px) are not training targets (fragments cut by a crop's border).
MIN_AREA = 5

#: ImageNet statistics (the backbone may start from ImageNet weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config() -> dict:
    """The default configuration (plain JSON-able values; it is stored in checkpoints)."""
    return {
        # backbone: a torchvision ResNet ("resnet18", "resnet34", "resnet50") + FPN P2-P5 (+ P6)
        "backbone": "resnet18", "norm": "batch", "pretrained": None, "trainable_layers": 5, "fpn_channels": 128,
        # one anchor size per pyramid level (P2..P6), three aspect ratios
        "anchor_sizes": [[8], [16], [32], [64], [128]], "aspect_ratios": [0.5, 1.0, 2.0],
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        # RPN (pre-NMS top-n is per pyramid level, post-NMS per image)
        "rpn_pre_nms_top_n_train": 3000, "rpn_post_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 6000, "rpn_post_nms_top_n_test": 4000,
        "rpn_batch_size_per_image": 512, "rpn_nms_thresh": 0.7,
        # RoI heads
        "box_batch_size_per_image": 512, "box_positive_fraction": 0.25, "box_detections_per_img": 2000,
        "box_score_thresh": 0.05, "box_nms_thresh": 0.5, "representation_size": 512,
        "mask_channels": 64, "mask_layers": 4,
        # Gong et al.'s additions
        "semantic_channels": 64, "semantic_weight": 1.0, "focal_gamma": 2.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# losses


def focal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss ``mean(-(1 - p_t)^gamma log p_t)`` of ``N x C`` logits and ``N`` class indices; equal to
    ``F.cross_entropy`` at ``gamma = 0``."""
    if target.numel() == 0:
        return logits.sum() * 0
    logp_t = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0:
        return -logp_t.mean()
    return (-((1 - logp_t.exp()).clamp(min=0) ** gamma) * logp_t).mean()


def focal_bce_with_logits(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss ``mean((1 - p_t)^gamma BCE)`` (no alpha weighting) of logits and targets in [0, 1] (soft
    targets allowed: ``p_t = p t + (1 - p)(1 - t)``); equal to ``F.binary_cross_entropy_with_logits`` at
    ``gamma = 0``."""
    if target.numel() == 0:
        return logits.sum() * 0
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if gamma == 0:
        return ce.mean()
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma).mean()


def _fastrcnn_focal_loss(class_logits, box_regression, labels, regression_targets, gamma):
    """torchvision's ``fastrcnn_loss`` with the classification cross-entropy replaced by focal loss."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    cls_loss = focal_cross_entropy(class_logits, labels, gamma)
    pos = torch.where(labels > 0)[0]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9,
                                reduction="sum") / max(1, labels.numel())
    return cls_loss, box_loss


def _maskrcnn_focal_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs, gamma):
    """torchvision's ``maskrcnn_loss`` with the binary cross-entropy replaced by focal loss."""
    m = mask_logits.shape[-1]
    labels = [lab[idx] for lab, idx in zip(gt_labels, matched_idxs)]
    mask_targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, matched_idxs)
                    if p.shape[0] > 0]
    if not mask_targets:
        return mask_logits.sum() * 0
    labels = torch.cat(labels, dim=0)
    mask_targets = torch.cat(mask_targets, dim=0)
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return focal_bce_with_logits(picked, mask_targets, gamma)


# ----------------------------------------------------------------------------------------------------------------
# the network


class FocalRoIHeads(RoIHeads):
    """torchvision's box and mask RoI heads with focal losses (``focal_gamma``); boxes and masks only (no
    keypoints). In eval mode the detections carry ``mask_probs`` (``n x 1 x M x M`` probabilities in each box),
    not masks pasted into the image (which would be ``n x H x W``: 8 GB for 2,000 nuclei on a 1000-px tile)."""

    def __init__(self, *args, focal_gamma: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.focal_gamma = float(focal_gamma)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_cls, loss_box = _fastrcnn_focal_loss(class_logits, box_regression, labels, regression_targets,
                                                      self.focal_gamma)
            mask_proposals, pos_matched = [], []
            for props, idx, lab in zip(proposals, matched_idxs, labels):
                pos = torch.where(lab > 0)[0]
                mask_proposals.append(props[pos])
                pos_matched.append(idx[pos])
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals,
                                                                                image_shapes)))
            loss_mask = _maskrcnn_focal_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                             [t["labels"] for t in targets], pos_matched, self.focal_gamma)
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        mask_probs = maskrcnn_inference(mask_logits, labels)
        result = [{"boxes": b, "labels": lab, "scores": s, "mask_probs": mp}
                  for b, lab, s, mp in zip(boxes, labels, scores, mask_probs)]
        return result, {}


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


class SemanticHead(nn.Module):
    """Panoptic FPN's semantic head: P2..P5 brought to 1/4 resolution by (conv3x3-GN-ReLU, 2x upsampling) stages
    (1, 1, 2, 3 stages), summed, and a 1 x 1 conv to ``num_classes`` logits at 1/4 resolution."""

    def __init__(self, in_channels: int, channels: int = 64, levels: int = 4, num_classes: int = 2):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for k in range(levels):
            layers: list[nn.Module] = []
            for j in range(max(1, k)):
                layers += [nn.Conv2d(in_channels if j == 0 else channels, channels, 3, padding=1, bias=False),
                           _gn(channels), nn.ReLU(inplace=True)]
                if k > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = None
        for head, f in zip(self.scale_heads, feats):
            y = head(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        return self.predictor(x)


class _NativeScaleTransform(GeneralizedRCNNTransform):
    """torchvision's normalisation and batching (padding to a multiple of 32) without the resizing."""

    def resize(self, image, target=None):
        return image, target


def _backbone(cfg: dict):
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    norms: dict[str, Callable] = {"batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d, "group": _gn}
    if cfg["norm"] not in norms:
        raise ValueError(f"config['norm'] must be one of {sorted(norms)}, got {cfg['norm']!r}")
    name = cfg["backbone"]
    if not name.startswith("resnet") or not hasattr(torchvision.models, name):
        raise ValueError(f"config['backbone'] must be a torchvision ResNet (resnet18, resnet34, resnet50, ...), "
                         f"got {name!r}")
    net = getattr(torchvision.models, name)(weights=None, norm_layer=norms[cfg["norm"]])
    if cfg.get("pretrained"):
        if cfg["norm"] == "group":
            raise ValueError("ImageNet ResNet weights need norm 'batch' or 'frozen', not 'group'")
        state = torch.load(cfg["pretrained"], map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    trainable = int(cfg["trainable_layers"])
    if not 0 <= trainable <= 5:
        raise ValueError(f"config['trainable_layers'] must be in [0, 5], got {trainable}")
    train_names = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for pname, p in net.named_parameters():
        if not any(pname.startswith(t) for t in train_names):
            p.requires_grad_(False)
    c2 = net.inplanes // 8  # layer1's output channels (64 for resnet18/34, 256 for resnet50)
    return BackboneWithFPN(net, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           [c2, 2 * c2, 4 * c2, 8 * c2], int(cfg["fpn_channels"]), extra_blocks=LastLevelMaxPool())


class NucleiMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN for nuclei (see the module docstring), built from a config by :func:`build`.

    ``forward(images, targets=None)``: ``images`` a list of ``3 x H x W`` float tensors in [0, 1] (or one
    ``N x 3 x H x W`` tensor). In training mode ``targets`` is a list of dicts with ``boxes`` (n x 4 float, x1 y1
    x2 y2), ``labels`` (n int64, all 1), ``masks`` (n x H x W uint8) and ``semantic`` (H x W int64, 1 = nucleus);
    it returns the losses ``loss_objectness``, ``loss_rpn_box_reg`` (torchvision's RPN), ``loss_classifier``
    (focal), ``loss_box_reg``, ``loss_mask`` (focal) and ``loss_semantic`` (cross-entropy, unweighted). In eval
    mode it returns one dict per image: ``boxes``, ``labels``, ``scores`` (descending), ``mask_probs``
    (``n x 1 x 28 x 28`` in each box: see :func:`instances_from_detections`) and ``semantic`` (``H x W`` nucleus
    probability); with ``paste_masks=True`` also torchvision's ``masks`` (``n x 1 x H x W``; memory-hungry).
    """

    def __init__(self, config: dict):
        cfg = {**default_config(), **(config or {})}
        backbone = _backbone(cfg)
        ch = backbone.out_channels
        sizes = tuple(tuple(int(s) for s in level) for level in cfg["anchor_sizes"])
        if len(sizes) != 5:
            raise ValueError(f"config['anchor_sizes'] must give sizes for the 5 pyramid levels P2..P6, got {sizes}")
        ratios = tuple(float(r) for r in cfg["aspect_ratios"])
        anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
        rep = int(cfg["representation_size"])
        mch = int(cfg["mask_channels"])
        super().__init__(
            backbone, num_classes=None, min_size=800, max_size=1333,
            image_mean=list(cfg["image_mean"]), image_std=list(cfg["image_std"]),
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=int(cfg["rpn_pre_nms_top_n_train"]),
            rpn_post_nms_top_n_train=int(cfg["rpn_post_nms_top_n_train"]),
            rpn_pre_nms_top_n_test=int(cfg["rpn_pre_nms_top_n_test"]),
            rpn_post_nms_top_n_test=int(cfg["rpn_post_nms_top_n_test"]),
            rpn_batch_size_per_image=int(cfg["rpn_batch_size_per_image"]), rpn_nms_thresh=float(cfg["rpn_nms_thresh"]),
            box_head=TwoMLPHead(ch * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, 2),
            mask_head=MaskRCNNHeads(ch, (mch,) * int(cfg["mask_layers"]), 1, norm_layer=_gn),
            mask_predictor=MaskRCNNPredictor(mch, mch, 2),
        )
        self.config = cfg
        self.transform = _NativeScaleTransform(800, 1333, list(cfg["image_mean"]), list(cfg["image_std"]))
        self.roi_heads = FocalRoIHeads(
            MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), self.roi_heads.box_head, self.roi_heads.box_predictor,
            0.5, 0.5, int(cfg["box_batch_size_per_image"]), float(cfg["box_positive_fraction"]), None,
            float(cfg["box_score_thresh"]), float(cfg["box_nms_thresh"]), int(cfg["box_detections_per_img"]),
            mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2), mask_head=self.roi_heads.mask_head,
            mask_predictor=self.roi_heads.mask_predictor, focal_gamma=float(cfg["focal_gamma"]),
        )
        self.semantic_head = SemanticHead(ch, int(cfg["semantic_channels"]))
        self.semantic_weight = float(cfg["semantic_weight"])

    def forward(self, images, targets=None, *, paste_masks: bool = False):
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        images = list(images)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        sem = self.semantic_head([features[k] for k in ("0", "1", "2", "3")])
        sem = F.interpolate(sem, size=image_list.tensors.shape[-2:], mode="bilinear", align_corners=False)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, det_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            ce, npx = sem.new_zeros(()), 0
            for i, (h, w) in enumerate(sizes):
                t = targets[i]["semantic"].long()
                ce = ce + F.cross_entropy(sem[i:i + 1, :, :h, :w], t[None], reduction="sum")
                npx += h * w
            return {**rpn_losses, **det_losses, "loss_semantic": ce / max(1, npx)}
        prob = torch.softmax(sem, 1)[:, 1]
        for i, (h, w) in enumerate(sizes):
            detections[i]["semantic"] = prob[i, :h, :w]
            if paste_masks:
                detections[i]["masks"] = paste_masks_in_image(detections[i]["mask_probs"], detections[i]["boxes"],
                                                              (h, w))
        return detections


def build(config: dict | None = None) -> NucleiMaskRCNN:
    """The network of a config (missing keys take :func:`default_config`'s values)."""
    return NucleiMaskRCNN({**default_config(), **(config or {})})


# ----------------------------------------------------------------------------------------------------------------
# targets, batches and the loss


def targets(image, labels, *, min_area: int = MIN_AREA) -> dict[str, np.ndarray]:
    """Mask R-CNN targets of one sample (``image`` is not used).

    Returns ``boxes`` (n x 4 float32: x1, y1, x2, y2 in pixel edges, so ``x2 - x1`` is the width), ``masks``
    (n x H x W uint8), ``labels`` (n int64, all 1) and ``semantic`` (H x W int64, 1 = nucleus). Nuclei of fewer
    than ``min_area`` pixels are left out of the instances (they stay in ``semantic``); a tile without nuclei gives
    n = 0.
    """
    lab = as_labels(labels, "labels")
    h, w = lab.shape
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if ids.size:
        dense = np.where(lab > 0, np.searchsorted(ids, lab) + 1, 0).astype(np.int32)
    else:
        dense = np.zeros((h, w), np.int32)
    areas = np.bincount(dense.ravel(), minlength=ids.size + 1)
    boxes, masks = [], []
    for i, sl in enumerate(ndi.find_objects(dense), 1):
        if sl is None or areas[i] < min_area:
            continue
        m = np.zeros((h, w), np.uint8)
        m[sl] = dense[sl] == i
        masks.append(m)
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "masks": np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
        "labels": np.ones(len(boxes), np.int64),
        "semantic": (lab > 0).astype(np.int64),
    }


def collate(samples, device=None) -> dict:
    """A training batch from ``samples``: a sequence of ``(image_uint8 HxWx3, labels HxW, targets)`` with
    ``targets`` from :func:`targets` (what :func:`napari_nucsynth.train.train` passes), all of one size.

    Returns ``{"image": N x 3 x H x W float in [0, 1], "semantic": N x H x W int64, "boxes": [n_i x 4 float32],
    "masks": [n_i x H x W uint8], "labels": [n_i int64]}``: the per-instance targets stay lists, since each image
    holds a different number of nuclei. Everything is on ``device``.
    """
    imgs = np.stack([np.asarray(s[0]) for s in samples]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    batch = {"image": torch.from_numpy(imgs).to(device),
             "semantic": torch.from_numpy(np.stack([s[2]["semantic"] for s in samples])).to(device)}
    for key in ("boxes", "masks", "labels"):
        batch[key] = [torch.from_numpy(np.ascontiguousarray(s[2][key])).to(device) for s in samples]
    return batch


#: the loss terms as logged: model key -> log name
_TERMS = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box_reg", "loss_classifier": "box_focal",
          "loss_box_reg": "box_reg", "loss_mask": "mask_focal", "loss_semantic": "semantic"}


def loss(model: NucleiMaskRCNN, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a batch from :func:`collate` (model in training mode): torchvision's RPN losses, focal box
    classification, box regression, focal mask loss and ``semantic_weight`` x the semantic cross-entropy. Logs:
    ``loss`` and each term (unweighted) under the names ``rpn_objectness``, ``rpn_box_reg``, ``box_focal``,
    ``box_reg``, ``mask_focal``, ``semantic``."""
    tgts = [{"boxes": b.float(), "labels": lab, "masks": m, "semantic": s}
            for b, lab, m, s in zip(batch["boxes"], batch["labels"], batch["masks"], batch["semantic"])]
    losses = model(list(batch["image"]), tgts)
    total = sum(v * (model.semantic_weight if k == "loss_semantic" else 1.0) for k, v in losses.items())
    logs = {"loss": float(total.detach())}
    logs.update({_TERMS.get(k, k): float(v.detach()) for k, v in losses.items()})
    return total, logs


# ----------------------------------------------------------------------------------------------------------------
# inference


def _paste_prob(mask: torch.Tensor, box, shape) -> tuple[int, int, np.ndarray]:
    """A detection's ``M x M`` mask probability resampled onto the image pixels of its box: ``(row0, col0, prob)``.

    The inverse of how the training targets are made (torchvision's ``roi_align`` of the ground-truth mask, not
    aligned: pixel ``i`` sits at coordinate ``i``, bin ``j`` samples box coordinate ``(j + 0.5) / M``): pixel ``c``
    of a box ``[x1, x2)`` reads the mask at box coordinate ``(c - x1) / (x2 - x1)``, bilinearly, edge bins extended.
    """
    h, w = shape
    x1, y1, x2, y2 = (float(v) for v in box)
    c0, c1 = max(0, math.ceil(x1)), min(w, math.ceil(x2))
    r0, r1 = max(0, math.ceil(y1)), min(h, math.ceil(y2))
    if c1 <= c0 or r1 <= r0:
        return r0, c0, np.zeros((0, 0), np.float32)
    gx = 2 * (torch.arange(c0, c1, dtype=torch.float32) - x1) / max(x2 - x1, 1e-3) - 1
    gy = 2 * (torch.arange(r0, r1, dtype=torch.float32) - y1) / max(y2 - y1, 1e-3) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # 1 x rows x cols x (x, y)
    out = F.grid_sample(mask[None, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return r0, c0, out[0, 0].numpy()


def instances_from_detections(det: dict, shape, *, score_threshold: float = 0.5, mask_threshold: float = 0.5,
                              min_foreground: float = 0.5, max_overlap: float = 0.5,
                              min_area: int = MIN_AREA) -> np.ndarray:
    """uint32 instance labels from one image's detections (eval output of :class:`NucleiMaskRCNN`).

    Detections scoring at least ``score_threshold`` are pasted by descending score: each mask is its probability
    above ``mask_threshold``; it is dropped when fewer than ``min_foreground`` of its pixels are foreground in the
    semantic branch (probability >= 0.5; 0 disables the veto), when more than ``max_overlap`` of it is already taken
    by better detections, or when fewer than ``min_area`` pixels remain; otherwise it takes its pixels not yet
    taken.
    """
    h, w = (int(s) for s in shape)
    out = np.zeros((h, w), np.uint32)
    scores = det["scores"].detach().float().cpu()
    keep = torch.where(scores >= score_threshold)[0]
    if keep.numel() == 0:
        return out
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    boxes = det["boxes"].detach().float().cpu()[keep]
    probs = det["mask_probs"].detach().float().cpu()[keep][:, 0]
    sem = det.get("semantic")
    fg = None if sem is None or min_foreground <= 0 else sem.detach().float().cpu().numpy() >= 0.5
    nid = 0
    for box, prob in zip(boxes, probs):
        r0, c0, p = _paste_prob(prob, box, (h, w))
        m = p > mask_threshold
        area = int(m.sum())
        if area < max(1, min_area):
            continue
        r1, c1 = r0 + m.shape[0], c0 + m.shape[1]
        if fg is not None and fg[r0:r1, c0:c1][m].mean() < min_foreground:
            continue
        view = out[r0:r1, c0:c1]
        free = m & (view == 0)
        n_free = int(free.sum())
        if n_free < min_area or n_free < (1 - max_overlap) * area:
            continue
        nid += 1
        view[free] = nid
    return out


_PARAMS = {"score_threshold": 0.5, "mask_threshold": 0.5, "min_foreground": 0.5, "max_overlap": 0.5,
           "min_area": MIN_AREA}


def detect(model: NucleiMaskRCNN, rgb: np.ndarray, device=None) -> dict:
    """The model's eval output for one RGB uint8 image (in one piece), as CPU tensors: ``boxes``, ``labels``,
    ``scores``, ``mask_probs`` and ``semantic`` (see :class:`NucleiMaskRCNN`). The model must be in eval mode."""
    if device is None:
        device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb).transpose(2, 0, 1).astype(np.float32) / 255.0).to(device)
    with torch.inference_mode():
        det = model([x])[0]
    return {k: v.detach().cpu() for k, v in det.items()}


class DetectionCache:
    """The detections of the last ``maxsize`` image pieces, keyed by their pixels (a digest): running
    :func:`predict` again on the same image with other post-processing parameters skips the network. Keep one per
    model."""

    def __init__(self, maxsize: int = 9):
        from collections import OrderedDict

        self.maxsize = int(maxsize)
        self._items: OrderedDict = OrderedDict()

    @staticmethod
    def key(rgb: np.ndarray) -> tuple:
        import hashlib

        return rgb.shape, hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=16).hexdigest()

    def get(self, rgb: np.ndarray, compute: Callable[[], dict]) -> dict:
        k = self.key(rgb)
        if k in self._items:
            self._items.move_to_end(k)
            return self._items[k]
        det = compute()
        self._items[k] = det
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return det

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget every cached detection (the next :func:`predict` runs the network)."""
        self._items.clear()


def predict(model: NucleiMaskRCNN, image, device=None, tta: bool = False, progress=None, should_stop=None,
            *, tile: int = 1024, overlap: int = 128, cache: DetectionCache | None = None, **params) -> np.ndarray:
    """uint32 instance labels of an RGB image of any size.

    Images up to ``tile`` px run in one piece; larger ones in overlapping tiles
    (:func:`napari_nucsynth.tiling.segment_tiled`: each nucleus taken whole from one tile). ``tta`` merges
    the 8 flips/rotations of each tile by instance voting (:func:`~napari_nucsynth.tiling.tta_instances`).
    ``cache`` (a :class:`DetectionCache` of this model) keeps the network's outputs per piece. ``params`` go to
    :func:`instances_from_detections`: ``score_threshold`` (0.5; scores below the model's ``box_score_thresh``,
    0.05, are never seen), ``mask_threshold`` (0.5), ``min_foreground`` (0.5), ``max_overlap`` (0.5),
    ``min_area`` (5).
    """
    from ..tiling import segment_tiled, tta_instances

    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise ValueError(f"unknown maskrcnn parameter(s) {sorted(unknown)}; known: {sorted(_PARAMS)}")
    opts = {**_PARAMS, **params}
    img = as_rgb(image, "image")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def one(rgb: np.ndarray) -> np.ndarray:
        if cache is None:
            det = detect(model, rgb, device)
        else:
            det = cache.get(rgb, lambda: detect(model, rgb, device))
        return instances_from_detections(det, rgb.shape[:2], **opts)

    def fn(rgb: np.ndarray) -> np.ndarray:
        return tta_instances(one, rgb) if tta else one(rgb)

    try:
        return segment_tiled(fn, img, tile=tile, overlap=overlap, progress=progress, should_stop=should_stop)
    finally:
        model.train(was_training)


SPEC = register_model(ModelSpec(kind="maskrcnn", build=build, default_config=default_config, targets=targets,
                                   loss=loss, predict=predict, collate=collate))
