"""The Mask R-CNN model (semantic branch, focal losses), its targets, inference and segmenter (tiny configs, small
crops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import MASKRCNN
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss

from napari_nucsynth.models import (
    get_model,
    load_checkpoint,
    model_kinds,
    save_checkpoint,
)
from napari_nucsynth.models.maskrcnn import (
    _fastrcnn_focal_loss,
    _maskrcnn_focal_loss,
    focal_bce_with_logits,
    focal_cross_entropy,
    instances_from_detections,
)
from napari_nucsynth.segment import segment, segmenters

TILE = "TCGA-HE-7130-01Z-00-DX1"  # dense: 60-90 nuclei per 128-px crop; the fixture ships its [640:768, 640:768]
TINY = MASKRCNN
TERMS = {"loss", "rpn_objectness", "rpn_box_reg", "box_focal", "box_reg", "mask_focal", "semantic"}


def _discs(shape=(64, 80)) -> np.ndarray:
    lab = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, (r, c, rad) in enumerate([(16, 16, 7), (16, 31, 7), (44, 50, 9), (50, 15, 6)], 1):
        lab[((yy - r) ** 2 + (xx - c) ** 2 <= rad**2) & (lab == 0)] = i
    lab[60:62, 70:72] = 9  # 4 px: too small to be a target
    return lab


def _batch(spec, crops):
    return spec.collate([(im, lb, spec.targets(im, lb)) for im, lb in crops], "cpu")


@pytest.fixture(scope="module")
def spec():
    assert "maskrcnn" in model_kinds()
    return get_model("maskrcnn")


@pytest.fixture(scope="module")
def crop(load_tile):
    img, lab = load_tile(TILE)
    assert img.shape[:2] == (128, 128)
    return img.copy(), lab.copy()


def test_targets_boxes_masks_and_empty_tiles(spec):
    lab = _discs()
    t = spec.targets(None, lab)
    assert t["boxes"].dtype == np.float32 and t["masks"].dtype == np.uint8 and t["labels"].dtype == np.int64
    assert t["boxes"].shape == (4, 4) and t["masks"].shape == (4, 64, 80)  # the 4-px nucleus is left out
    assert (t["labels"] == 1).all()
    assert t["semantic"].dtype == np.int64 and np.array_equal(t["semantic"], (lab > 0).astype(np.int64))
    # boxes are pixel edges: the first disc (centre 16, 16, radius 7) spans pixels 9..23
    np.testing.assert_array_equal(t["boxes"][0], [9, 9, 24, 24])
    for box, m in zip(t["boxes"], t["masks"]):
        rows, cols = np.nonzero(m)
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == tuple(box)
    # ids need not be contiguous
    t2 = spec.targets(None, np.where(lab > 0, lab * 1000, 0).astype(np.uint32))
    np.testing.assert_array_equal(t2["boxes"], t["boxes"])
    empty = spec.targets(None, np.zeros((32, 48), np.uint32))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 32, 48) and empty["labels"].shape == (0,)


def test_forward_train_and_eval(spec):
    torch.manual_seed(0)
    model = spec.build(TINY)
    lab = _discs()  # 64 x 80: not multiples of 32, padded by torchvision and cropped back
    img = np.random.default_rng(0).integers(0, 255, (*lab.shape, 3), dtype=np.uint8)
    empty = np.zeros_like(lab)
    batch = _batch(spec, [(img, lab), (img, empty)])  # a tile without nuclei in the same batch
    assert isinstance(batch["boxes"], list) and batch["image"].shape == (2, 3, 64, 80)
    model.train()
    total, logs = spec.loss(model, batch)
    assert set(logs) == TERMS
    assert torch.isfinite(total) and all(np.isfinite(v) for v in logs.values())
    assert logs["semantic"] > 0 and logs["mask_focal"] > 0 and logs["box_focal"] > 0
    total.backward()
    assert model.semantic_head.predictor.weight.grad is not None
    model.eval()
    with torch.inference_mode():
        out = model(list(batch["image"]))
    assert len(out) == 2
    for det in out:
        assert {"boxes", "labels", "scores", "mask_probs", "semantic"} <= set(det)
        n = det["boxes"].shape[0]
        assert det["mask_probs"].shape == (n, 1, 28, 28) and det["scores"].shape == (n,)
        assert det["semantic"].shape == (64, 80)
        assert float(det["semantic"].min()) >= 0 and float(det["semantic"].max()) <= 1
    labels = spec.predict(model, img, "cpu", score_threshold=0.0)
    assert labels.dtype == np.uint32 and labels.shape == lab.shape


def test_only_empty_tiles_train(spec):
    torch.manual_seed(0)
    model = spec.build(TINY).train()
    z = np.zeros((64, 64), np.uint32)
    img = np.full((64, 64, 3), 200, np.uint8)
    total, logs = spec.loss(model, _batch(spec, [(img, z), (img, z)]))
    assert torch.isfinite(total) and logs["mask_focal"] == 0 and logs["box_reg"] == 0
    total.backward()


def test_focal_losses_reduce_to_cross_entropy_at_gamma_0():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g) * 3
    target = torch.randint(0, 2, (50,), generator=g)
    torch.testing.assert_close(focal_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target))
    # gamma = 2 is -(1 - p_t)^2 log p_t: confident correct examples count far less than under cross-entropy
    p_t = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(focal_cross_entropy(logits, target, 2.0), (-(1 - p_t) ** 2 * p_t.log()).mean())
    easy = torch.tensor([[-4.0, 4.0]])
    one = torch.tensor([1])
    assert focal_cross_entropy(easy, one, 2.0) < 1e-3 * F.cross_entropy(easy, one)
    x = torch.randn(10, 28, 28, generator=g) * 3
    t = torch.rand(10, 28, 28, generator=g)  # soft targets, as roi_align makes them
    torch.testing.assert_close(focal_bce_with_logits(x, t, 0.0), F.binary_cross_entropy_with_logits(x, t))
    p = torch.sigmoid(x)
    pt = p * t + (1 - p) * (1 - t)
    torch.testing.assert_close(focal_bce_with_logits(x, t, 2.0),
                               (F.binary_cross_entropy_with_logits(x, t, reduction="none") * (1 - pt) ** 2).mean())
    assert focal_bce_with_logits(x, t, 2.0) < focal_bce_with_logits(x, t, 0.0)


def test_roi_losses_match_torchvision_at_gamma_0():
    """The model's box and mask losses are torchvision's with (only) the cross-entropies made focal."""
    g = torch.Generator().manual_seed(1)
    class_logits, box_reg = torch.randn(40, 2, generator=g), torch.randn(40, 8, generator=g)
    labels = [torch.randint(0, 2, (25,), generator=g), torch.randint(0, 2, (15,), generator=g)]
    reg_t = [torch.randn(25, 4, generator=g), torch.randn(15, 4, generator=g)]
    ref = fastrcnn_loss(class_logits, box_reg, labels, reg_t)
    got = _fastrcnn_focal_loss(class_logits, box_reg, labels, reg_t, 0.0)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    focal = _fastrcnn_focal_loss(class_logits, box_reg, labels, reg_t, 2.0)
    assert focal[0] < ref[0] and torch.equal(focal[1], got[1])

    masks = [torch.from_numpy((_discs() == i).astype(np.uint8))[None] for i in (1, 3)]
    gt_masks = [torch.cat(masks), torch.cat(masks[::-1])]
    props = [torch.tensor([[8.0, 8, 25, 25], [40, 34, 60, 54], [9, 10, 24, 22]]), torch.tensor([[41.0, 35, 59, 53]])]
    idx = [torch.tensor([0, 1, 0]), torch.tensor([0])]
    gt_labels = [torch.ones(2, dtype=torch.int64)] * 2
    mask_logits = torch.randn(4, 2, 28, 28, generator=g)
    torch.testing.assert_close(_maskrcnn_focal_loss(mask_logits, props, gt_masks, gt_labels, idx, 0.0),
                               maskrcnn_loss(mask_logits, props, gt_masks, gt_labels, idx))
    assert _maskrcnn_focal_loss(mask_logits, props, gt_masks, gt_labels, idx, 2.0) < \
        maskrcnn_loss(mask_logits, props, gt_masks, gt_labels, idx)


def test_model_uses_focal_gamma(spec, crop):
    """Same weights and sampling, gamma 0 vs 2: only the focal terms change."""
    img, lab = crop
    batch = _batch(spec, [(img[:64, :64], lab[:64, :64])])
    torch.manual_seed(0)
    model = spec.build(TINY).train()
    torch.manual_seed(1)
    _, at2 = spec.loss(model, batch)
    model.roi_heads.focal_gamma = 0.0
    torch.manual_seed(1)
    _, at0 = spec.loss(model, batch)
    assert at2["box_focal"] < at0["box_focal"] and at2["mask_focal"] < at0["mask_focal"]
    for k in ("rpn_objectness", "rpn_box_reg", "box_reg", "semantic"):
        assert at2[k] == pytest.approx(at0[k], rel=1e-4)


def test_a_few_steps_reduce_the_loss(spec, crop):
    img, lab = crop
    batch = _batch(spec, [(img, lab)])
    assert len(batch["boxes"][0]) > 40
    torch.manual_seed(0)
    model = spec.build(TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hist = []
    for _ in range(10):
        total, logs = spec.loss(model, batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        hist.append(logs)
    first, last = np.mean([h["loss"] for h in hist[:2]]), np.mean([h["loss"] for h in hist[-2:]])
    assert last < 0.8 * first, [round(h["loss"], 3) for h in hist]
    assert hist[-1]["semantic"] < hist[0]["semantic"]


def _det(boxes, scores, probs=None, semantic=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = boxes.shape[0]
    probs = torch.ones(n, 1, 28, 28) if probs is None else probs
    out = {"boxes": boxes, "scores": torch.tensor(scores), "labels": torch.ones(n, dtype=torch.int64),
           "mask_probs": probs}
    if semantic is not None:
        out["semantic"] = torch.from_numpy(semantic)
    return out


def test_instances_from_detections():
    shape = (60, 60)
    # a full mask fills its box exactly (pixel edges)
    lab = instances_from_detections(_det([[10, 20, 20, 26]], [0.9]), shape)
    assert lab.dtype == np.uint32 and lab.shape == shape
    rows, cols = np.nonzero(lab)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 25, 10, 19)
    # by descending score, whatever the order given; a near-duplicate is dropped, a partly overlapping one keeps
    # its free pixels; scores under the threshold are ignored
    det = _det([[0, 0, 20, 20], [1, 1, 20, 20], [10, 0, 30, 20], [40, 40, 50, 50]], [0.6, 0.95, 0.8, 0.3])
    lab = instances_from_detections(det, shape)
    assert lab.max() == 2
    assert lab[5, 5] == 1 and lab[0, 0] == 0  # the best box (1..19) wins; the duplicate's extra edge is not pasted
    assert lab[5, 25] == 2 and lab[5, 15] == 1
    assert not lab[40:, 40:].any()
    assert instances_from_detections(det, shape, score_threshold=0.2).max() == 3
    # the semantic branch vetoes a detection lying outside the predicted foreground
    sem = np.zeros(shape, np.float32)
    sem[:30, :30] = 0.9
    det = _det([[5, 5, 15, 15], [40, 40, 55, 55]], [0.9, 0.9], semantic=sem)
    assert instances_from_detections(det, shape).max() == 1
    assert instances_from_detections(det, shape, min_foreground=0).max() == 2
    # mask threshold: a mask of probability 0.4 is empty at 0.5
    det = _det([[5, 5, 15, 15]], [0.9], probs=torch.full((1, 1, 28, 28), 0.4))
    assert not instances_from_detections(det, shape).any()
    assert instances_from_detections(det, shape, mask_threshold=0.3).max() == 1
    assert not instances_from_detections(_det(np.zeros((0, 4)), []), shape).any()


def test_checkpoint_round_trip_through_the_segmenter(spec, crop, tmp_path, monkeypatch):
    import napari_nucsynth.models.maskrcnn as model_mod
    import napari_nucsynth.segment.maskrcnn as seg_mod

    assert "maskrcnn" in segmenters()
    img = crop[0][:96, :96]
    torch.manual_seed(0)
    model = spec.build(TINY)
    p = save_checkpoint(tmp_path / "m.pt", kind="maskrcnn", config={**spec.default_config(), **TINY},
                        state_dict=model.state_dict(), step=1)
    assert load_checkpoint(p, kind="maskrcnn")["config"]["focal_gamma"] == 2.0
    lab = segment(img, method="maskrcnn", checkpoint=p, device="cpu", score_threshold=0.0)
    assert lab.dtype == np.uint32 and lab.shape == img.shape[:2]
    cached, cache = next(iter(seg_mod._MODELS.values()))
    assert seg_mod.load_model(p, "cpu") is cached and len(cache) == 1

    # the same image again, other parameters: the cached detections are post-processed, the network is not run
    def no_network(*args, **kwargs):
        raise AssertionError("the network ran again")

    monkeypatch.setattr(model_mod, "detect", no_network)
    np.testing.assert_array_equal(segment(img, method="maskrcnn", checkpoint=p, device="cpu", score_threshold=0.0),
                                  lab)
    fewer = segment(img, method="maskrcnn", checkpoint=p, device="cpu", score_threshold=0.0, min_area=30)
    assert fewer.max() <= lab.max()
    # once the cache is cleared (as the benchmark does before timing), the network runs again
    seg_mod.clear_detection_cache()
    assert len(cache) == 0
    with pytest.raises(AssertionError, match="the network ran again"):
        segment(img, method="maskrcnn", checkpoint=p, device="cpu")
    monkeypatch.undo()
    # grey and float inputs follow the project's one conversion rule; TTA and tiling give labels of the image's shape
    grey = segment(img[:48, :40, 0], method="maskrcnn", checkpoint=p, device="cpu", tta=True)
    assert grey.dtype == np.uint32 and grey.shape == (48, 40)
    tiled = spec.predict(cached, np.tile(img, (2, 1, 1))[:150], "cpu", tile=96, overlap=32, score_threshold=0.0)
    assert tiled.dtype == np.uint32 and tiled.shape == (150, 96)
    with pytest.raises(ValueError, match="unknown maskrcnn parameter"):
        segment(img, method="maskrcnn", checkpoint=p, device="cpu", np_threshold=0.5)


def test_segmenter_errors(spec, tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="nucsynth train --model maskrcnn"):
        segment(img, method="maskrcnn")
    wrong = save_checkpoint(tmp_path / "h.pt", kind="hovernet", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="'hovernet' model, not a 'maskrcnn'"):
        segment(img, method="maskrcnn", checkpoint=wrong, device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        segment(img, method="maskrcnn", checkpoint=tmp_path / "missing.pt", device="cpu")
