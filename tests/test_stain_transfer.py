"""Tests of stain/modality transfer (issue 21, Liu et al.): ``stain.transfer`` by Reinhard, Macenko and the DRIT++-style
model, the augmentation and test-time-augmentation hooks, and the drit model's training pieces (tiny widths)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nucsynth.stain import (
    StainReference,
    macenko_stains,
    mean_optical_density,
    modality_augment,
    modality_tta,
    od_distance,
    stain_reference,
    transfer,
)

A, B = "TCGA-A7-A13F-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"  # breast and liver, two hospitals
C = "TCGA-B0-5698-01Z-00-DX1"  # kidney

#: a drit model small enough to train in milliseconds a step at 32-64 px
TINY = {"n_domains": 2, "ngf": 4, "n_down": 1, "n_res": 1, "mlp_dim": 16, "style_dim": 4, "nef": 4,
        "enc_layers": 2, "ncf": 8, "ndf": 8, "d_layers": 2, "num_d": 1, "amp": "none"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny networks run fastest on one thread (and two threads spin against other jobs on a busy machine)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiles(load_tile):
    """Three real H&E crops of 160 x 160 from three hospitals."""
    return {k: load_tile(k)[0][:160, :160] for k in (A, B, C)}


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# reinhard and macenko


def test_reinhard_output_has_the_references_lab_statistics(tiles):
    from skimage.color import rgb2lab

    a, b = tiles[A], tiles[B]
    out = transfer(a, b, method="reinhard")
    assert out.shape == a.shape and out.dtype == np.uint8
    lo, lb, la = (rgb2lab(x).reshape(-1, 3) for x in (out, b, a))
    gap = np.abs(la.mean(0) - lb.mean(0)).max()
    assert gap > 5  # the two crops really differ
    assert np.abs(lo.mean(0) - lb.mean(0)).max() < 0.1 * gap + 1.0
    assert np.allclose(lo.std(0), lb.std(0), rtol=0.15, atol=1.0)
    # colours move, structure stays: luminance keeps its pattern
    assert _corr(lo[:, 0], la[:, 0]) > 0.98


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_transfer_to_itself_is_the_identity_up_to_rounding(tiles, method):
    a = tiles[A]
    out = transfer(a, a, method=method)
    assert np.abs(out.astype(int) - a).max() <= 1
    # a precomputed reference gives the same result as the image
    assert np.array_equal(transfer(a, stain_reference(a), method=method), out)


def test_macenko_transfer_takes_the_references_stains_and_keeps_the_haematoxylin_map(tiles):
    a, b = tiles[A], tiles[B]
    out = transfer(a, b, method="macenko")
    sa, sb, so = macenko_stains(a), macenko_stains(b), macenko_stains(out)
    angle = lambda u, v: np.degrees(np.arccos(np.clip(np.sum(u * v, 0), -1, 1)))  # noqa: E731 - per stain
    # the result's stain vectors are the reference's, not the source's (which differ by several degrees)
    assert angle(sa.vectors, sb.vectors).max() > 3
    assert angle(so.vectors, sb.vectors).max() < 0.35 * angle(sa.vectors, sb.vectors).max()
    # under the reference's stains, the result's concentrations span the reference's range
    od = lambda im: -np.log((im.reshape(-1, 3).astype(np.float64) + 1) / 240.0)  # noqa: E731
    conc_a = np.linalg.lstsq(sa.vectors, od(a).T, rcond=None)[0]
    conc_o = np.linalg.lstsq(sb.vectors, od(out).T, rcond=None)[0]
    assert np.abs(sa.max_concentrations / sb.max_concentrations - 1).max() > 0.1
    assert np.allclose(np.percentile(conc_o, 99, axis=1), sb.max_concentrations, rtol=0.05)
    # the haematoxylin concentration map keeps its structure (nuclei stay where they were)
    assert _corr(conc_a[0], conc_o[0]) > 0.97


def test_transfer_moves_the_mean_optical_density_towards_the_reference(tiles):
    a, b = tiles[A], tiles[C]
    for method in ("reinhard", "macenko"):
        out = transfer(a, b, method=method)
        assert od_distance(out, b) < od_distance(a, b)


def test_mean_optical_density():
    white = np.full((4, 4, 3), 255, np.uint8)
    assert np.allclose(mean_optical_density(white), 0)
    dark = white.copy()
    dark[..., 0] = 63  # absorbs red
    od = mean_optical_density(dark)
    assert od[0] == pytest.approx(np.log10(4)) and od[1] == pytest.approx(0)
    assert od_distance(white, dark) == pytest.approx(od_distance(dark, white)) == pytest.approx(np.log10(4))


def test_inputs_follow_the_projects_conversion_rule(tiles):
    a, b = tiles[A], tiles[B]
    ref = transfer(a, b, method="reinhard")
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    assert np.array_equal(transfer(rgba, b, method="reinhard"), ref)
    assert np.array_equal(transfer(a.astype(np.uint16) * 257, b, method="reinhard"), ref)
    assert np.array_equal(transfer(a / 255.0, b.astype(np.uint16) * 257, method="reinhard"), ref)
    grey = a[..., 1]
    out = transfer(grey, b, method="macenko")
    assert out.shape == a.shape and np.array_equal(out, transfer(np.dstack([grey] * 3), b, method="macenko"))
    with pytest.raises(ValueError, match="image"):
        transfer(a.astype(np.int32), b, method="reinhard")
    with pytest.raises(ValueError, match="reference"):
        transfer(a, np.zeros((5, 5, 2), np.uint8), method="reinhard")
    with pytest.raises(ValueError, match="method"):
        transfer(a, b, method="cyclegan")
    with pytest.raises(ValueError, match="reference.*stained pixels"):
        transfer(a, np.full((40, 40, 3), 250, np.uint8), method="macenko")
    with pytest.raises(ValueError, match="domain index needs method='drit'"):
        transfer(a, 1, method="macenko")
    with pytest.raises(InterruptedError):
        transfer(a, b, method="reinhard", should_stop=lambda: True)


def test_drit_without_a_model_says_how_to_train_one(tiles, monkeypatch, tmp_path):
    from napari_nucsynth.models import drit

    monkeypatch.setattr(drit, "default_checkpoint", lambda: tmp_path / "drit_monuseg.pt")
    with pytest.raises(ValueError, match=r"train_drit\.py.*method='reinhard'"):
        transfer(tiles[A], tiles[B])  # drit is the default method
    with pytest.raises(ValueError, match="does not exist"):
        transfer(tiles[A], tiles[B], method="drit", checkpoint=tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------
# the hooks: training augmentation and test-time augmentation


def test_modality_augment_restains_to_one_of_the_references_reproducibly(tiles):
    a = tiles[A]
    refs = [stain_reference(tiles[B]), stain_reference(tiles[C])]
    outs = [modality_augment(a, seed, refs) for seed in range(8)]
    assert all(np.array_equal(o, modality_augment(a, s, refs)) for s, o in enumerate(outs))
    candidates = [transfer(a, r, method="macenko") for r in refs]
    picked = [next(i for i, c in enumerate(candidates) if np.array_equal(o, c)) for o in outs]
    assert set(picked) == {0, 1}  # both references are drawn
    rein = modality_augment(a, 0, [tiles[B]], method="reinhard")
    assert np.array_equal(rein, transfer(a, tiles[B], method="reinhard"))
    # a reference without tissue has no stains to estimate: Macenko falls back to Reinhard
    blank = np.full((32, 32, 3), 245, np.uint8)
    blank[::2, ::2] = 235
    assert np.array_equal(modality_augment(a, 0, [blank]), transfer(a, blank, method="reinhard"))
    # a crop without tissue has no stains to change: it comes back as it was
    assert np.array_equal(modality_augment(blank, 0, refs), blank)
    with pytest.raises(ValueError, match="references"):
        modality_augment(a, 0, [])


def test_modality_tta_averages_the_maps_of_the_restained_copies(tiles):
    a = tiles[A]
    refs = [tiles[B], tiles[C]]
    predict = lambda im: np.dstack([im[..., 0] / 255.0, 1 - im[..., 2] / 255.0])  # noqa: E731 - any dense maps
    copies = [a] + [transfer(a, r, method="macenko") for r in refs]
    want = np.mean([predict(c) for c in copies], 0)
    got = modality_tta(a, refs, predict)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.allclose(got, want, atol=1e-6)
    without = modality_tta(a, refs, predict, include_original=False)
    assert np.allclose(without, np.mean([predict(c) for c in copies[1:]], 0), atol=1e-6)
    calls = []
    labels = modality_tta(a, refs, predict, postprocess=lambda m: (m[..., 0] > 0.5).astype(np.uint32),
                          progress=lambda d, t, w: calls.append((d, t)))
    assert np.array_equal(labels, (want[..., 0] > 0.5).astype(np.uint32))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="height and width"):
        modality_tta(a, refs, lambda im: np.zeros((3, 3)))
    with pytest.raises(InterruptedError):
        modality_tta(a, refs, predict, should_stop=lambda: True)


# ----------------------------------------------------------------------------------------------------------------
# the drit model


def test_domain_maps_targets_and_pairing():
    from napari_nucsynth.models import drit

    imgs = [np.zeros((6, 7, 3), np.uint8), np.zeros((5, 5), np.uint8)]
    maps = drit.domain_maps(imgs, [2, 0])
    assert [m.shape for m in maps] == [(6, 7), (5, 5)] and maps[0].dtype == np.uint32
    assert int(drit.targets(imgs[0], maps[0])["domain"]) == 2
    inst = np.zeros((6, 7), np.uint32)
    inst[2:4, 2:4] = 1
    with pytest.raises(ValueError, match="domain map"):
        drit.targets(imgs[0], inst)  # instance labels are not domains
    with pytest.raises(ValueError, match="domains"):
        drit.domain_maps(imgs, [0])
    for doms in ([0, 0, 1, 1], [0, 1, 2, 0, 0], [1, 1, 1], [0, 2, 2, 2, 2, 1]):
        d = np.array(doms)
        p = drit._pairs(d)
        assert np.array_equal(p[p], np.arange(len(d)))  # an involution: swapping twice comes back
        n_cross = int(np.sum(d != d[p]))
        best = 2 * min(len(d) // 2, len(d) - np.bincount(d).max())  # most samples that can meet another domain
        assert n_cross == best


def _two_domain_batch(size: int = 32, n: int = 4, seed: int = 0):
    """Crops of one synthetic H&E-like tile, half of them in a blue-tinted second 'modality'."""
    import torch
    from _tiny import synthetic_pair

    from napari_nucsynth.models import drit

    rng = np.random.default_rng(seed)
    img, _ = synthetic_pair(seed, 96)
    samples = []
    for i in range(n):
        r, c = rng.integers(0, 96 - size, 2)
        crop = img[r : r + size, c : c + size]
        if i % 2:
            crop = np.clip(crop * np.array([0.75, 0.85, 1.1]), 0, 255).astype(np.uint8)
        samples.append((crop, None, {"domain": np.asarray(i % 2)}))
    torch.manual_seed(seed)
    return drit.collate(samples, "cpu")


def test_adain_normalises_each_sample_with_its_own_style():
    import torch

    from napari_nucsynth.models import drit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 7, generator=g) * torch.tensor([1.0, 4.0, 0.5])[:, None, None, None] + 2
    params = torch.randn(3, 10, generator=g)
    y = drit._AdaIN(5)(x, params)
    scale, shift = params[:, :5], params[:, 5:]
    # each channel of each sample: mean = its shift, standard deviation = |1 + its scale| (biased, as IN)
    assert torch.allclose(y.mean((2, 3)), shift, atol=1e-4)
    assert torch.allclose(y.std((2, 3), unbiased=False), (1 + scale).abs(), rtol=1e-3, atol=1e-4)
    # per sample: a sample's result does not depend on the others in the batch
    assert torch.allclose(drit._AdaIN(5)(x[1:2], params[1:2]), y[1:2], atol=1e-5)
    # the pattern is kept: the normalised map is the input's, standardised per channel
    z = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), unbiased=False, keepdim=True)
    assert torch.allclose((y - shift[..., None, None]) / (1 + scale[..., None, None]), z, atol=1e-3)


def test_translate_is_the_cross_self_and_cycle_translations_and_losses_detach_as_they_should():
    import torch

    from napari_nucsynth.models import drit

    torch.manual_seed(0)
    model = _lively_drit()
    batch = _two_domain_batch(32, 4)
    p = batch["pair"]
    with torch.no_grad():
        f = drit.translate(model, batch)
        x = batch["image"] * 2 - 1
        c = model.content_encoder(x)
        G = model.generator
        # the doubled generator call: the first half is the cross translation, the second the self-reconstruction
        assert torch.allclose(f["c"], c, atol=1e-5) and torch.allclose(f["u"], G(c, f["z"][p]), atol=1e-5)
        assert torch.allclose(f["x_self"], G(c, f["z"]), atol=1e-5)
        assert not torch.allclose(f["u"], f["x_self"], atol=1e-3)  # two domains, two styles: not the same image
        assert torch.allclose(f["mu2"], model.style_encoder(f["u"])[0], atol=1e-5)
    # the discriminators' loss reaches the discriminators only; the generator's loss reaches the encoders and the
    # generator, never the discriminators' weights
    f = drit.translate(model, batch)
    d_loss, _ = drit.discriminator_loss(model, batch, f)
    d_loss.backward()
    assert all(q.grad is None for n in model.G_MODULES for q in getattr(model, n).parameters())
    assert all(q.grad is not None for q in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    g_loss, logs = drit.generator_loss(model, batch, f)
    g_loss.backward()
    assert all(q.grad is None for q in model.discriminator.parameters())
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in model.g_parameters())
    # without a forward pass given, both losses make their own (finite)
    assert np.isfinite(float(drit.discriminator_loss(model, batch)[0].detach()))
    assert set(drit.generator_loss(model, batch)[1]) == set(logs)


def _lively_drit():
    """A tiny drit model with unit-gain random generator weights (its outputs depend visibly on the style)."""
    import math

    import torch

    from napari_nucsynth.models import drit

    model = drit.build(TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in model.G_MODULES:
            for q in getattr(model, n).parameters():
                if q.dim() > 1:
                    q.copy_(torch.randn(q.shape, generator=g) / math.sqrt(q[0].numel()))
    return model.train()


def test_train_step_updates_every_part_and_learns_two_modalities():
    import torch

    from napari_nucsynth.models import drit

    torch.manual_seed(0)
    model = drit.build(TINY)
    opts = drit.optimizers(model, 2e-3)
    batches = [_two_domain_batch(32, 8, seed=s) for s in range(4)]
    assert batches[0]["pair"].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = drit.train_step(model, batches[0], opts, 0)
    assert set(logs) >= {"loss", "g_gan", "g_content", "g_rec", "g_cyc", "g_kl", "g_style", "d_loss", "d_content"}
    assert all(np.isfinite(v) for v in logs.values())
    moved = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("discriminator") else "")
             for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"content_encoder", "style_encoder", "generator", "discriminator.image",
            "discriminator.content"} <= moved
    first = logs["g_rec"]
    for step in range(1, 120):
        logs = drit.train_step(model, batches[step % 4], opts, step)
    assert logs["g_rec"] < 0.5 * first and logs["g_cyc"] < 0.5 * first
    # the (moving-average) style encoder tells the two modalities apart, and the generator renders the content of
    # one in the style of the other: the mean colour moves most of the way to the other modality's
    test = _two_domain_batch(32, 16, seed=9)
    d = test["domain"].numpy()
    x = test["image"] * 2 - 1
    with torch.no_grad():
        mu = model.ema["style_encoder"](x)[0].numpy()
        between = np.linalg.norm(mu[d == 0].mean(0) - mu[d == 1].mean(0))
        within = np.mean([mu[d == k].std(0).mean() for k in (0, 1)])
        z1 = torch.from_numpy(mu[d == 1].mean(0, keepdims=True)).expand(int((d == 0).sum()), -1)
        u = model.ema["generator"](model.ema["content_encoder"](x[d == 0]), z1)
    m0, m1, mu_u = (((t + 1) / 2).mean((0, 2, 3)).numpy() for t in (x[d == 0], x[d == 1], u))
    assert between > 5 * within
    assert np.linalg.norm(mu_u - m1) < 0.6 * np.linalg.norm(m0 - m1)
    ema_gap = max(float((a - b).detach().abs().max()) for a, b in zip(model.ema["generator"].parameters(),
                                                                       model.generator.parameters()))
    assert 0 < ema_gap  # the moving average lags the live weights
    with pytest.raises(ValueError, match="2 domains"):
        drit.train_step(model, {**batches[0], "domain": batches[0]["domain"] + 1}, opts, 120)


@pytest.fixture(scope="module")
def tiny_drit(tmp_path_factory, load_tile):
    """A tiny drit checkpoint trained for 2 steps by the one training loop on two fixture tiles in two domains,
    with domain styles in its config (as ``benchmarks/train_drit.py`` writes them)."""
    import torch

    from napari_nucsynth.models import drit, load_checkpoint, save_checkpoint
    from napari_nucsynth.train import train

    imgs = [load_tile(A)[0][:96, :96], load_tile(B)[0][:96, :96]]
    path = tmp_path_factory.mktemp("drit") / "tiny_drit.pt"
    res = train("drit", imgs, drit.domain_maps(imgs, [0, 1]), steps=2, out=path, config=TINY, device="cpu",
                seed=0, batch_size=2, crop=32, val_fraction=0, save_every=100)
    ck = load_checkpoint(res.path, kind="drit")
    model = drit.load_model(res.path, "cpu")
    # two steps barely move SPADE's small initial style-encoder weights (style codes near 0 for any image): make
    # them larger, so that references visibly differ
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("ema.style_encoder", "style_encoder")) and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    styles = [drit.encode_style(model, im)[0].tolist() for im in imgs]
    save_checkpoint(path, kind="drit", config={**ck["config"], "domain_styles": styles}, step=ck["step"],
                    state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
                    train_data=ck["train_data"])
    return path


def test_drit_transfer_through_stain_transfer(tiny_drit, tiles):
    from napari_nucsynth.models import drit, load_checkpoint

    ck = load_checkpoint(tiny_drit, kind="drit")
    assert ck["step"] == 2 and ck["config"]["n_domains"] == 2
    a = tiles[A][:37, :53]  # odd sizes: padded to the model's multiple and cropped back
    out = transfer(a, tiles[B], method="drit", checkpoint=tiny_drit, device="cpu", seed=0)
    assert out.shape == a.shape and out.dtype == np.uint8
    assert np.array_equal(out, transfer(a, tiles[B], method="drit", checkpoint=tiny_drit, device="cpu", seed=1))
    other = transfer(a, tiles[C], method="drit", checkpoint=tiny_drit, device="cpu")
    assert not np.array_equal(out, other)  # the reference's style code changes the result
    # a domain index restains with the checkpoint's stored style of that domain
    model = drit.load_model(tiny_drit, "cpu")
    by_domain = transfer(a, 1, method="drit", checkpoint=tiny_drit, device="cpu")
    want = drit.transfer(model, a, None, style=np.asarray(ck["config"]["domain_styles"][1], np.float32))
    assert np.array_equal(by_domain, want)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        transfer(a, 2, method="drit", checkpoint=tiny_drit, device="cpu")
    # the drit path of the hooks
    assert np.array_equal(modality_augment(a, 0, [1], checkpoint=tiny_drit), by_domain)
    ref = StainReference(image=tiles[B], lab_mean=np.zeros(3), lab_std=np.ones(3), stains=None)
    assert np.array_equal(transfer(a, ref, method="drit", checkpoint=tiny_drit, device="cpu"), out)


def test_stripped_drit_checkpoint_transfers_the_same(tiny_drit, tiles, tmp_path):
    from napari_nucsynth.models import load_checkpoint, save_checkpoint
    from napari_nucsynth.models.gan import SHIPPED_PREFIX

    ck = load_checkpoint(tiny_drit, kind="drit")
    kept = {k: v for k, v in ck["state_dict"].items() if k.startswith(SHIPPED_PREFIX)}
    assert not any(k.startswith("discriminator.") for k in kept)
    small = save_checkpoint(tmp_path / "small.pt", kind="drit", config=ck["config"], state_dict=kept, step=2)
    a = tiles[A][:64, :64]
    full = transfer(a, tiles[C], method="drit", checkpoint=tiny_drit, device="cpu")
    assert np.array_equal(transfer(a, tiles[C], method="drit", checkpoint=small, device="cpu"), full)


def test_drit_validation_reports_the_issue_figures(tiny_drit, tiles):
    from napari_nucsynth.models import drit

    model = drit.load_model(tiny_drit, "cpu")
    imgs = [tiles[A][:64, :64], tiles[B][:64, :64], tiles[C][:64, :64]]
    m = drit.validate(model, imgs, drit.domain_maps(imgs, [0, 1, 1]), "cpu")
    assert set(m) == {"rec_l1", "od_ratio", "h_corr"}
    assert 0 <= m["rec_l1"] <= 1 and m["od_ratio"] >= 0 and -1 <= m["h_corr"] <= 1
    prev = drit.preview(model, imgs[0], None, "cpu")
    assert prev.shape == (64, 192, 3) and np.array_equal(prev[:, :64], imgs[0])
    with pytest.raises(ValueError, match="not a segmenter"):
        drit.SPEC.predict(model, imgs[0])


def test_haematoxylin_structure_loss_ignores_the_stain_amount_not_the_nuclei_places(tiles):
    import torch

    from napari_nucsynth.models import drit

    img = tiles[A][:64, :64]
    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1
    # a paler copy (less stain, the same places): correlation near 1; a shifted copy (nuclei moved): much lower
    pale = 1 - (1 - x) * 0.6
    moved = torch.roll(x, shifts=(9, 9), dims=(2, 3))
    c = drit.haematoxylin_correlation(torch.cat([x, pale, moved]), torch.cat([x, x, x]))
    assert c.shape == (3,) and abs(float(c[0]) - 1) < 1e-4 and float(c[1]) > 0.95 and float(c[2]) < 0.6
    # differentiable, and in the generator's loss only when weighted
    torch.manual_seed(0)
    model = _lively_drit()
    batch = _two_domain_batch(32, 4)
    f = drit.translate(model, batch)
    assert "g_h" not in drit.generator_loss(model, batch, f)[1]  # default 0: checkpoints from before it unchanged
    model.config["lambda_h"] = 2.0
    loss, logs = drit.generator_loss(model, batch, f)
    expected = 2.0 * float((1 - drit.haematoxylin_correlation(f["u"], batch["image"] * 2 - 1)).mean().detach())
    assert abs(logs["g_h"] - expected) < 1e-4 and logs["g_h"] > 0
    loss.backward()
    assert all(q.grad is not None for q in model.generator.parameters())


def test_init_takes_config_overrides_of_loss_weights(tiny_drit, load_tile, tmp_path):
    from napari_nucsynth.models import drit, load_checkpoint
    from napari_nucsynth.train import train

    imgs = [load_tile(A)[0][:96, :96], load_tile(B)[0][:96, :96]]
    res = train("drit", imgs, drit.domain_maps(imgs, [0, 1]), steps=1, out=tmp_path / "tuned.pt", init=tiny_drit,
                config={"lambda_h": 3.0}, device="cpu", seed=0, batch_size=2, crop=32, val_fraction=0)
    a, b = load_checkpoint(tiny_drit, kind="drit"), load_checkpoint(res.path, kind="drit")
    assert b["config"]["lambda_h"] == 3.0 and a["config"]["lambda_h"] == 0.0
    assert {k: v for k, v in b["config"].items() if k != "lambda_h"} == {
        k: v for k, v in a["config"].items() if k != "lambda_h"}
    with pytest.raises(ValueError, match=r"overrides \['ngf'\] change the network"):
        train("drit", imgs, drit.domain_maps(imgs, [0, 1]), steps=1, out=tmp_path / "wider.pt", init=tiny_drit,
              config={"ngf": 8}, device="cpu", seed=0, batch_size=2, crop=32, val_fraction=0)
    assert not (tmp_path / "wider.pt").exists()


def test_drit_strength_moves_the_style_from_the_image_own_to_the_reference(tiny_drit, tiles):
    from napari_nucsynth.models import drit, load_checkpoint, save_checkpoint

    model = drit.load_model(tiny_drit, "cpu")
    a, b = tiles[A][:64, :64], tiles[B][:64, :64]
    full = transfer(a, b, method="drit", checkpoint=tiny_drit, device="cpu")
    assert np.array_equal(full, transfer(a, b, method="drit", checkpoint=tiny_drit, device="cpu", strength=1.0))
    own = drit.transfer(model, a, None, style=drit.style_code(model, a))
    assert np.array_equal(transfer(a, b, method="drit", checkpoint=tiny_drit, device="cpu", strength=0.0), own)
    za, zb = drit.style_code(model, a), drit.style_code(model, b)
    assert not np.allclose(za, zb)  # the fixture's style encoder tells the two tiles apart
    half = transfer(a, b, method="drit", checkpoint=tiny_drit, device="cpu", strength=0.5)
    assert np.array_equal(half, drit.transfer(model, a, None, style=(za + zb) / 2))
    assert not np.array_equal(half, full)
    # the checkpoint's config["strength"] is the default
    ck = load_checkpoint(tiny_drit, kind="drit")
    path = tiny_drit.parent / "tiny_drit_half.pt"
    save_checkpoint(path, kind="drit", config={**ck["config"], "strength": 0.5}, state_dict=ck["state_dict"],
                    step=ck["step"], train_data=ck["train_data"])
    assert np.array_equal(transfer(a, b, method="drit", checkpoint=path, device="cpu"), half)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="strength must be"):
            transfer(a, b, method="drit", checkpoint=tiny_drit, device="cpu", strength=bad)
    with pytest.raises(ValueError, match="strength is a drit setting"):
        transfer(a, b, method="macenko", strength=0.5)


def test_choose_drit_strength_rule():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from choose_drit_strength import choose

    def rows(*t):
        return [{"strength": s, "aji_ratio": a, "od_ratio": o} for s, a, o in t]

    # the largest strength meeting both margins
    assert choose(rows((0.5, 0.97, 0.5), (0.75, 0.95, 0.3), (1.0, 0.89, 0.15))) == 0.75
    # none meets both: the smallest within the od margin (the most content it allows)
    assert choose(rows((0.5, 0.93, 0.45), (0.75, 0.92, 0.35), (1.0, 0.85, 0.2))) == 0.75
    assert choose(rows((0.5, 0.99, 0.6), (1.0, 0.99, 0.45))) == 1.0  # none within the od margin: full transfer


def test_the_shipped_drit_model_restains_towards_the_reference_and_keeps_its_settings(tiles):
    """The shipped drit (trained on the CPU, docs/stain_transfer.md) loads without a checkpoint argument, carries
    the strength chosen on training tiles and its domains' styles, holds only what transfers, restains
    reproducibly and moves the mean optical density towards the reference's."""
    from napari_nucsynth.models import drit, load_checkpoint

    path = drit.default_checkpoint()
    if not path.is_file():
        pytest.skip("no drit model ships with this version")
    ck = load_checkpoint(path, kind="drit")
    assert ck["config"]["strength"] == 0.75 and len(ck["config"]["domain_styles"]) == ck["config"]["n_domains"]
    assert all(k.startswith("ema.") for k in ck["state_dict"])
    a, b = tiles[C][:128, :128], tiles[B][:128, :128]  # kidney to liver: two hospitals
    out = transfer(a, b, method="drit", device="cpu")
    assert out.shape == a.shape and np.array_equal(out, transfer(a, b, method="drit", device="cpu"))
    assert od_distance(out, b) < 0.7 * od_distance(a, b)
    assert _corr(_h_density(out), _h_density(a)) > 0.7  # the nuclei stay where they were


def _h_density(img):
    from napari_nucsynth.stain import rgb_to_hed

    return rgb_to_hed(img)[..., 0]
