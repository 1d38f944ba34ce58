"""Data-parallel training under torchrun: two CPU processes (gloo) stay in sync, rank 0 alone saves, a stop on
one rank stops both, a resumed run continues exactly, and ``nucsynth train`` (the CLI's main) runs on each
rank, rank 0 alone reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from _tiny import HOVERNET, SIAN

from napari_nucsynth.models import load_checkpoint

TILE = "TCGA-A7-A13F-01Z-00-DX1"

#: runs on every rank: trains probed copies of the registered kinds (the probe keeps the model and the batches)
SCRIPT = textwrap.dedent('''
    import dataclasses, faulthandler, hashlib, json, os, sys
    import numpy as np
    import napari_nucsynth.models as M
    from napari_nucsynth.train import _default_collate, train

    faulthandler.dump_traceback_later(120, exit=True)  # a hung rank prints where it is and ends
    out, cfg = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    d = np.load(os.path.join(out, "data.npz"))
    imgs, labs = [d["i0"], d["i1"]], [d["l0"], d["l1"]]
    models, batches, saved = {}, {}, []

    def probe(kind):
        spec = M.get_model(kind)

        def build(c):
            models[kind] = spec.build(c)
            return models[kind]

        def collate(samples, device):
            batches.setdefault(kind, []).append(hashlib.sha1(np.stack([s[0] for s in samples]).tobytes()).hexdigest())
            return (spec.collate or _default_collate)(samples, device)

        M.register_model(dataclasses.replace(spec, kind=kind + "_probe", build=build, collate=collate))

    def digest(model):
        h = hashlib.sha1()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    save = M.save_checkpoint
    M.save_checkpoint = lambda path, **kw: (saved.append(str(path)), save(path, **kw))[1]
    probe("hovernet"); probe("sian")
    kw = dict(batch_size=1, crop=64, val_fraction=0, device="cpu", save_every=1000)
    steps = []
    # rank 0 alone asks to stop after step 2: both ranks stop there
    a = train("hovernet_probe", imgs, labs, steps=4, out=os.path.join(out, "a.pt"), config=cfg["hovernet"], seed=1,
              on_update=lambda e: steps.append(e.step) if e.kind == "step" else None,
              should_stop=lambda: rank == 0 and len(steps) >= 2, **kw)
    b = train("hovernet_probe", imgs, labs, steps=4, out=os.path.join(out, "b.pt"), resume=a.path, **kw)
    hb = digest(models["hovernet"])
    c = train("hovernet_probe", imgs, labs, steps=4, out=os.path.join(out, "c.pt"), config=cfg["hovernet"], seed=1,
              **kw)
    hc = digest(models["hovernet"])
    s = train("sian_probe", imgs, labs, steps=2, out=os.path.join(out, "s.pt"), config=cfg["sian"], seed=1,
              lr=2e-4, **kw)
    # the command, as `torchrun -m napari_nucsynth.cli train ...` runs it on each rank
    import contextlib, io
    from napari_nucsynth.cli import main
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        code = main(["train", "--model", "hovernet", "--images", os.path.join(out, "im"), "--labels",
                     os.path.join(out, "lb"), "--steps", "2", "--out", os.path.join(out, "cli.pt"), "--batch-size",
                     "1", "--crop", "64", "--val-fraction", "0", "--device", "cpu", "--config",
                     json.dumps(cfg["hovernet"])])
    json.dump({"stopped": [a.stopped, a.step], "resumed": b.step, "hovernet": hb, "hovernet_full": hc,
               "sian": digest(models["sian"]), "batches": batches, "saved": saved, "reported": steps,
               "cli": [code, said.getvalue()]},
              open(os.path.join(out, f"rank{rank}.json"), "w"))
''')


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _torchrun(*args, timeout=150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, check=False)


def _digest(state_dict) -> str:
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(state_dict.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_two_processes_stay_in_sync_and_rank0_saves(load_tile, crop_pair_dirs, tmp_path):
    """One torchrun of two ranks (each launch is seconds of imports, so one launch tests it all): the train
    loop's stop, resume and sync, the GAN's two optimisers, and ``nucsynth train`` (the CLI's main) as a rank."""
    img, lab = load_tile(TILE)
    np.savez(tmp_path / "data.npz", i0=img[:128, :128], l0=lab[:128, :128], i1=img[128:256, :128],
             l1=lab[128:256, :128])
    (tmp_path / "run.py").write_text(SCRIPT)
    cfg = json.dumps({"hovernet": HOVERNET, "sian": SIAN})
    out = _torchrun(str(tmp_path / "run.py"), str(tmp_path), cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # a stop asked on rank 0 stopped both ranks after the same step; the resumed runs went on to the end
    assert r0["stopped"] == r1["stopped"] == [True, 2] and r0["resumed"] == r1["resumed"] == 4
    # each rank drew its own samples ...
    assert r0["batches"]["hovernet"][0] != r1["batches"]["hovernet"][0]
    assert r0["batches"]["sian"][0] != r1["batches"]["sian"][0]
    # ... yet the weights are the same on both (averaged gradients; the GAN's two optimisers too)
    assert r0["hovernet"] == r1["hovernet"] and r0["sian"] == r1["sian"]
    # only rank 0 reported and saved, once per checkpoint (the stop, and the end of each run)
    assert r1["saved"] == [] and r1["reported"] == []
    assert [os.path.basename(p) for p in r0["saved"]] == ["a.pt", "b.pt", "c.pt", "s.pt", "cli.pt"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # the checkpoint holds the ranks' weights and every rank's random state
    ck = load_checkpoint(tmp_path / "b.pt")
    assert ck["step"] == 4 and _digest(ck["state_dict"]) == r0["hovernet"] and len(ck["rng"]["ranks"]) == 2
    # stopped at 2 and resumed under torchrun = an uninterrupted run
    assert r0["hovernet"] == r0["hovernet_full"]
    # the command: both ranks ran it, rank 0 alone reported, its checkpoint records both ranks' random states
    assert r0["cli"][0] == r1["cli"][0] == 0
    assert r0["cli"][1].count("wrote ") == 1 and r1["cli"][1] == ""
    ck = load_checkpoint(tmp_path / "cli.pt", kind="hovernet")
    assert ck["step"] == 2 and len(ck["rng"]["ranks"]) == 2 and ck["config"]["width"] == 8
