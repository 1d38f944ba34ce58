"""Weight averaging of checkpoints ("model soup") with BatchNorm re-estimation: napari_nucsynth.train.average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import HOVERNET, MASKRCNN, synthetic_pair

from napari_nucsynth.models import get_model, load_checkpoint, save_checkpoint
from napari_nucsynth.train import average_checkpoints


def _checkpoint(path, seed: int, kind: str = "hovernet", config: dict = HOVERNET, step: int = 10,
                augment: str = "basic"):
    torch.manual_seed(seed)
    model = get_model(kind).build(config)
    with torch.no_grad():  # BatchNorm statistics that differ between the checkpoints, as trained ones do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed + 1)
    return save_checkpoint(path, kind=kind, config=config, state_dict=model.state_dict(), step=step + seed,
                           train_data={"tiles": [f"t{seed}"], "augment": augment})


def _pairs(n: int = 2):
    pairs = [synthetic_pair(s, size=96) for s in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_average_without_pairs_is_the_mean_of_every_tensor(tmp_path):
    paths = [_checkpoint(tmp_path / f"{i}.pt", i) for i in range(3)]
    out = average_checkpoints(paths, tmp_path / "soup.pt")
    ck = load_checkpoint(out, kind="hovernet")
    sds = [load_checkpoint(p)["state_dict"] for p in paths]
    for key, value in ck["state_dict"].items():
        if value.is_floating_point():
            expected = (sds[0][key].double() + sds[1][key].double() + sds[2][key].double()) / 3
            assert torch.allclose(value.double(), expected, atol=1e-6), key
        else:
            assert torch.equal(value, sds[0][key]), key
    assert ck["config"] == HOVERNET and ck["step"] == 12 and "optimizer" not in ck
    assert [a["train_data"]["tiles"] for a in ck["train_data"]["averaged"]] == [["t0"], ["t1"], ["t2"]]
    assert ck["train_data"]["batchnorm"]["reestimated"] is False
    # the average of one model with itself is that model
    same = load_checkpoint(average_checkpoints([paths[0], paths[0]], tmp_path / "same.pt"))["state_dict"]
    assert all(torch.equal(same[k], sds[0][k]) for k in same)


@pytest.mark.parametrize("augment", ["basic", "strong", "modality", "modality-drit"])
def test_batchnorm_statistics_reestimated_on_training_crops(tmp_path, augment):
    paths = [_checkpoint(tmp_path / f"{i}.pt", i, augment=augment) for i in range(2)]
    imgs, labs = _pairs()
    calls = []
    kw = {"images": imgs, "labels": labs, "bn_batches": 3, "batch_size": 2, "crop": 64, "seed": 5, "device": "cpu"}
    a = average_checkpoints(paths, tmp_path / "a.pt", progress=lambda i, n, msg: calls.append((i, n)), **kw)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    ck = load_checkpoint(a)
    plain = load_checkpoint(average_checkpoints(paths, tmp_path / "plain.pt"))["state_dict"]
    sd = ck["state_dict"]
    bn_keys = [k for k in sd if k.endswith("running_mean")]
    assert bn_keys
    for k in bn_keys:
        base = k[: -len("running_mean")]
        assert not torch.allclose(sd[k], plain[k])  # new statistics, not the averaged ones
        assert bool((sd[base + "running_var"] >= 0).all())
        assert int(sd[base + "num_batches_tracked"]) == 3  # a cumulative average over the 3 batches
    for k in sd:  # the weights themselves are the plain mean
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(sd[k], plain[k]), k
    assert ck["train_data"]["batchnorm"] == {"reestimated": True, "batches": 3, "batch_size": 2, "crop": 64,
                                             "augment": augment, "images": 2, "seed": 5}
    # seeded: the same call gives the same statistics
    b = load_checkpoint(average_checkpoints(paths, tmp_path / "b.pt", **kw))["state_dict"]
    assert all(torch.equal(sd[k], b[k]) for k in sd)
    # the first BatchNorm's statistics are the mean, over the same seeded training crops, of its inputs' batch
    # statistics (the crops drawn here as the function draws them, with the runs' own augmentation)
    from napari_nucsynth.train import _augment, _modality_references, _other_references

    refs = _modality_references(imgs, range(len(imgs)), mode=augment) if augment.startswith("modality") else None
    model = get_model("hovernet").build(HOVERNET)
    model.load_state_dict(plain)
    name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for _ in range(3):
            crops = []
            for _ in range(2):
                i = int(rng.integers(0, len(imgs)))
                extra = {} if refs is None else {"references": _other_references(refs, i)}
                crops.append(_augment(imgs[i], labs[i], 64, rng, augment, **extra)[0])
            model(torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
    means = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(sd[name + ".running_mean"], means, atol=1e-5)
    assert torch.allclose(sd[name + ".running_var"], variances, rtol=1e-4, atol=1e-6)


def test_stop_writes_nothing(tmp_path):
    paths = [_checkpoint(tmp_path / f"{i}.pt", i) for i in range(2)]
    imgs, labs = _pairs(1)
    with pytest.raises(RuntimeError, match="stopped"):
        average_checkpoints(paths, tmp_path / "x.pt", images=imgs, labels=labs, bn_batches=5, crop=64,
                            should_stop=lambda: True)
    assert not (tmp_path / "x.pt").exists()


def test_average_errors(tmp_path):
    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([a], tmp_path / "x.pt")
    with pytest.raises(ValueError, match="bn_batches"):
        average_checkpoints([a, b], tmp_path / "x.pt", bn_batches=0)
    wide = _checkpoint(tmp_path / "w.pt", 2, config={**HOVERNET, "width": 16})
    with pytest.raises(ValueError, match="different configurations"):
        average_checkpoints([a, wide], tmp_path / "x.pt")
    m1 = _checkpoint(tmp_path / "m1.pt", 0, kind="maskrcnn", config=MASKRCNN)
    with pytest.raises(ValueError, match="cannot average"):
        average_checkpoints([a, m1], tmp_path / "x.pt")
    m2 = _checkpoint(tmp_path / "m2.pt", 1, kind="maskrcnn", config=MASKRCNN)
    imgs, labs = _pairs(1)
    with pytest.raises(ValueError, match="image alone"):
        average_checkpoints([m1, m2], tmp_path / "x.pt", images=imgs, labels=labs)
    assert load_checkpoint(average_checkpoints([m1, m2], tmp_path / "m.pt"), kind="maskrcnn")  # plain mean works
    with pytest.raises(ValueError, match="does not exist"):
        average_checkpoints([a, tmp_path / "missing.pt"], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_cli_average(tmp_path, capsys):
    import imageio.v3 as iio

    from napari_nucsynth.cli import main
    from napari_nucsynth.io import write_labels

    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    img, lab = synthetic_pair(0, size=96)
    iio.imwrite(tmp_path / "im" / "t.png", img)
    write_labels(tmp_path / "lb" / "t.png", lab)
    out = tmp_path / "soup.pt"
    assert main(["average", str(a), str(b), "--out", str(out), "--images", str(tmp_path / "im"), "--labels",
                 str(tmp_path / "lb"), "--bn-batches", "2", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    td = load_checkpoint(out)["train_data"]
    assert td["batchnorm"]["batches"] == 2 and td["command"].startswith("nucsynth average")
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "soup.pth")]) == 2
    assert ".pt" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "--out", str(out), "--images", str(tmp_path / "im")]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["average", str(a), str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert np.isfinite(load_checkpoint(out)["state_dict"]["stem.0.weight"].numpy()).all()
