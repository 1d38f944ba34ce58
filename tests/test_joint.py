"""Gong et al.'s joint G-D-S loop (:mod:`napari_nucsynth.train.joint`): the signs of the gradients (the generator
ascends the segmenter's loss through the reversal layer, or descends it in the AC-GAN ablation), the segmenter's and
the discriminator's steps, exact resume, stop, and exported parts usable by the renderers and segmenters.

Tiny networks, crops of 64 px, synthetic H&E-like tiles: the file runs in well under a minute on one core.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _tiny import ADAIN, SIAN
from _tiny import HOVERNET as HOVER
from _tiny import MASKRCNN as MRCNN
from _tiny import synthetic_pair as _pair

from napari_nucsynth.models import load_checkpoint
from napari_nucsynth.render import render
from napari_nucsynth.segment import segment
from napari_nucsynth.train import TrainUpdate
from napari_nucsynth.train import joint as J
from napari_nucsynth.train.joint import (
    export_parts,
    grad_reverse,
    lambda_at,
    part_paths,
    train_joint,
)

GEN_CFG = {"adain": ADAIN, "sian": SIAN}
SEG_CFG = {"hovernet": HOVER, "maskrcnn": MRCNN}


@pytest.fixture(scope="module")
def data():
    pairs = [_pair(s) for s in range(3)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _joint(gen: str, seg: str, adversarial: str = "reverse", seed: int = 0) -> J._Joint:
    from napari_nucsynth.models import get_model

    torch.manual_seed(seed)
    gcfg = {**get_model(gen).default_config(), **GEN_CFG[gen]}
    scfg = {**get_model(seg).default_config(), **SEG_CFG[seg]}
    disc = J._ADAPTERS[gen].default_disc_cfg()
    if disc is not None:
        disc["ndf"] = 8
    return J._Joint(gen, seg, gcfg, scfg, disc, dev=torch.device("cpu"), lr_g=1e-3, lr_s=1e-3,
                    adversarial=adversarial, synthetic_weight=1.0, adv_weight=1.0)


def _gen_params(j: J._Joint) -> list[torch.Tensor]:
    return [p for p in j.gen.parameters() if p.requires_grad and p is not None]


def _seg_syn_loss(j: J._Joint, real, syn, seeds) -> torch.Tensor:
    """The segmenter's loss on the synthetic images (a graph through the generator)."""
    batch = j.adapter.prepare(real, syn, seeds, j.dev)
    fake, _, _ = j.adapter.synthesize(batch)
    sb = j.seg_batch([r[0] for r in real], syn)
    sb["image"] = fake
    return j.sspec.loss(j.seg, sb)[0]


def _grad_of_seg_loss(gen: str, seg: str, real, syn, seeds) -> list[torch.Tensor]:
    j = _joint(gen, seg)
    params = _gen_params(j)
    torch.manual_seed(1)
    loss = _seg_syn_loss(j, real, syn, seeds)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _update(gen: str, seg: str, adversarial: str, real, syn, seeds, *, global_loss: bool) -> list[torch.Tensor]:
    """The change of the generator's parameters in one joint step (lambda 1)."""
    j = _joint(gen, seg, adversarial)
    if not global_loss:  # only the segmenter's term reaches the generator
        j.adapter.g_loss = lambda batch, fake, own: (fake.sum() * 0.0, {})
    before = [p.detach().clone() for p in _gen_params(j)]
    torch.manual_seed(1)
    j.step("joint", real, syn, seeds, 1.0)
    return [p.detach() - b for p, b in zip(_gen_params(j), before)]


def _dot(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


@pytest.fixture(scope="module")
def step_data(data):
    imgs, labs = data
    return J._draw(imgs, labs, [0, 1, 2], 2, 64, np.random.default_rng(5))


def test_grad_reverse_and_lambda_ramp():
    x = torch.ones(3, requires_grad=True)
    y = grad_reverse(x, -0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    assert lambda_at(3, 5, 15, 0.1) == 0.0  # before the joint phase
    ramp = [lambda_at(s, 5, 15, 0.1) for s in range(5, 15)]
    assert all(a < b for a, b in itertools.pairwise(ramp)) and 0 < ramp[0] and abs(ramp[-1] - 0.1) < 1e-4


@pytest.mark.parametrize("gen", ["adain", "sian"])
def test_generator_ascends_segmenter_loss_with_reversal_and_descends_with_acgan(gen, step_data):
    real, syn, seeds = step_data
    g = _grad_of_seg_loss(gen, "hovernet", real, syn, seeds)
    assert sum(float(x.abs().sum()) for x in g) > 0
    # the segmenter's term alone: the update goes up its gradient with the reversal layer, down it with AC-GAN
    up = _update(gen, "hovernet", "reverse", real, syn, seeds, global_loss=False)
    down = _update(gen, "hovernet", "acgan", real, syn, seeds, global_loss=False)
    assert _dot(up, g) > 0
    assert _dot(down, g) < 0
    # with the global loss too, the reversal moves the generator further up the segmenter's loss than AC-GAN does
    up = _update(gen, "hovernet", "reverse", real, syn, seeds, global_loss=True)
    down = _update(gen, "hovernet", "acgan", real, syn, seeds, global_loss=True)
    assert _dot([a - b for a, b in zip(up, down)], g) > 0


def test_reversed_step_raises_the_segmenter_loss_on_synthetic_images(step_data):
    """A small step against the segmenter, in loss terms: a tiny SGD-like step along the reversed gradient."""
    real, syn, seeds = step_data
    j = _joint("adain", "hovernet")
    j.adapter.g_loss = lambda batch, fake, own: (fake.sum() * 0.0, {})
    for o in j.opts.values():
        for grp in o.param_groups:
            grp["lr"] = 1e-4
    j.opts["seg"].param_groups[0]["lr"] = 0.0  # keep the segmenter fixed to see the generator's effect alone
    j.seg.eval()  # fixed statistics: the loss is a function of the generator only
    with torch.no_grad():
        before = float(_seg_syn_loss(j, real, syn, seeds))
    j.step("joint", real, syn, seeds, 1.0)
    with torch.no_grad():
        after = float(_seg_syn_loss(j, real, syn, seeds))
    assert after > before


def test_segmenter_step_lowers_its_loss_and_discriminator_step_its_own(step_data):
    real, syn, seeds = step_data
    j = _joint("adain", "hovernet")
    batch = j.adapter.prepare(real, syn, seeds, j.dev)
    with torch.no_grad():
        fake, _, _ = j.adapter.synthesize(batch)
    sr = j.seg_batch([r[0] for r in real], [r[1] for r in real])
    ss = j.seg_batch([r[0] for r in real], syn)
    ss["image"] = fake

    def seg_loss():
        with torch.no_grad():
            return float(j.sspec.loss(j.seg, sr)[0] + j.sspec.loss(j.seg, ss)[0])

    def d_loss():
        with torch.no_grad():
            return float(j.adapter.d_loss(batch, fake)[0])

    s0, d0 = seg_loss(), d_loss()
    d_before = [p.detach().clone() for p in j.adapter.disc.parameters()]
    j.step("joint", real, syn, seeds, 0.1)
    assert seg_loss() < s0
    assert d_loss() < d0
    assert any(not torch.equal(a, b) for a, b in zip(d_before, j.adapter.disc.parameters()))
    # pretraining the segmenter touches neither the generator nor the discriminator
    g_before = [p.detach().clone() for p in _gen_params(j)]
    d_before = [p.detach().clone() for p in j.adapter.disc.parameters()]
    j.step("segmenter", real, syn, seeds, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(g_before, _gen_params(j)))
    assert all(torch.equal(a, b) for a, b in zip(d_before, j.adapter.disc.parameters()))


def _states(path) -> dict:
    return load_checkpoint(path, kind="joint")["state_dict"]


def test_resume_equals_uninterrupted_and_stop_saves_and_exports(data, tmp_path):
    imgs, labs = data
    kw = {"steps": 5, "batch_size": 2, "crop": 64, "pretrain_steps": (1, 1), "device": "cpu", "seed": 3, "generator_config": ADAIN,
              "segmenter_config": HOVER, "save_every": 100}
    full = train_joint("adain", "hovernet", imgs, labs, out=tmp_path / "full.pt", **kw)
    assert full.step == 5 and not full.stopped
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    ups: list[TrainUpdate] = []
    part = train_joint("adain", "hovernet", imgs, labs, out=tmp_path / "part.pt", should_stop=stop_after_three,
                       on_update=ups.append, **kw)
    assert part.stopped and part.step == 3
    g_out, s_out = part_paths(tmp_path / "part.pt")
    assert g_out.is_file() and s_out.is_file()  # stopping exports the parts too
    assert {u.path for u in ups if u.kind == "checkpoint"} == {str(tmp_path / "part.pt"), str(g_out), str(s_out)}
    assert part.metrics["generator_checkpoint"] == str(g_out)
    steps = [u for u in ups if u.kind == "step"]
    assert [u.step for u in steps] == [1, 2, 3] and "seg_syn" in steps[-1].losses and "d_loss" in steps[0].losses
    resumed = train_joint("adain", "hovernet", imgs, labs, out=tmp_path / "part.pt", resume=part.path, **kw)
    assert resumed.step == 5
    a, b = _states(full.path), _states(resumed.path)
    for net in ("generator", "segmenter", "discriminator"):
        assert a[net].keys() == b[net].keys() and a[net]
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    ck = load_checkpoint(full.path, kind="joint")
    assert ck["config"]["generator"] == "adain" and ck["config"]["segmenter"] == "hovernet"
    assert {"gen_g", "gen_d", "seg"} <= set(ck["optimizer"]) and "rng" in ck


def test_exported_parts_render_and_segment(data, tmp_path):
    imgs, labs = data
    res = train_joint("adain", "hovernet", imgs, labs, steps=2, out=tmp_path / "j.pt", batch_size=2, crop=64,
                      pretrain_steps=(0, 0), device="cpu", generator_config=ADAIN, segmenter_config=HOVER)
    g, s = part_paths(res.path)
    assert load_checkpoint(g, kind="adain") and load_checkpoint(s, kind="hovernet")
    out = render(labs[0], imgs[1], method="adain", checkpoint=g, style_labels=labs[1], seed=0, device="cpu")
    assert out.shape == imgs[0].shape and out.dtype == np.uint8
    pred = segment(imgs[0], method="hovernet", checkpoint=s, device="cpu")
    assert pred.shape == labs[0].shape and pred.dtype == np.uint32
    g2, _s2 = export_parts(res.path, tmp_path / "g2.pt", tmp_path / "s2.pt")
    assert load_checkpoint(g2)["train_data"]["joint_checkpoint"] == str(res.path)


def test_sian_with_maskrcnn_trains_and_exports(data, tmp_path):
    imgs, labs = data
    res = train_joint("sian", "maskrcnn", imgs, labs, steps=3, out=tmp_path / "sm.pt", batch_size=2, crop=64,
                      pretrain_steps=(1, 1), device="cpu", generator_config=SIAN, segmenter_config=MRCNN,
                      adversarial="acgan")
    ck = load_checkpoint(res.path, kind="joint")
    assert ck["config"]["adversarial"] == "acgan" and ck["state_dict"]["discriminator"] == {}
    g, s = part_paths(res.path)
    out = render(labs[0][:64, :64], imgs[1], method="sian", checkpoint=g, seed=0, device="cpu")
    assert out.shape == (64, 64, 3)
    pred = segment(imgs[0], method="maskrcnn", checkpoint=s, device="cpu")
    assert pred.shape == labs[0].shape


def test_generator_and_segmenter_checkpoints_start_the_run(data, tmp_path):
    imgs, labs = data
    res = train_joint("adain", "hovernet", imgs, labs, steps=1, out=tmp_path / "a.pt", batch_size=2, crop=64,
                      pretrain_steps=(1, 0), device="cpu", generator_config=ADAIN, segmenter_config=HOVER)
    g, s = part_paths(res.path)
    res2 = train_joint("adain", "hovernet", imgs, labs, steps=1, out=tmp_path / "b.pt", batch_size=2, crop=64,
                       device="cpu", generator_checkpoint=g, segmenter_checkpoint=s, segmenter_lr=2e-4)
    ck = load_checkpoint(res2.path, kind="joint")
    assert ck["config"]["pretrain_steps"] == [0, 0]  # both parts given: straight to the joint phase
    assert ck["config"]["segmenter_config"]["width"] == 8
    assert ck["config"]["lr_segmenter"] == 2e-4
    assert 0 < ck["optimizer"]["seg"]["param_groups"][0]["lr"] <= 2e-4  # the schedule scales the given peak


def test_bad_arguments(data, tmp_path):
    imgs, labs = data
    kw = {"steps": 2, "out": tmp_path / "x.pt", "crop": 64, "device": "cpu"}
    with pytest.raises(ValueError, match="generator must be one of"):
        train_joint("classic", "hovernet", imgs, labs, **kw)
    with pytest.raises(ValueError, match="segmenter must be one of"):
        train_joint("adain", "watershed", imgs, labs, **kw)
    with pytest.raises(ValueError, match="adversarial"):
        train_joint("adain", "hovernet", imgs, labs, adversarial="up", **kw)
    with pytest.raises(ValueError, match="pretrain_steps"):
        train_joint("adain", "hovernet", imgs, labs, pretrain_steps=(2, 1), **kw)
    with pytest.raises(ValueError, match="steps"):
        train_joint("adain", "hovernet", imgs, labs, **{**kw, "steps": 0})
