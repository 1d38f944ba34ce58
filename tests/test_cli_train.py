"""``nucsynth train`` as a command: Ctrl-C / SIGTERM save and say how to resume, the resumed run ends where an
uninterrupted one ends, progress output, ``--config``, ``--model joint``."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _tiny import HOVERNET

from napari_nucsynth.cli import _StopOnSignal, _TrainReport, main
from napari_nucsynth.models import load_checkpoint
from napari_nucsynth.train import TrainResult, TrainUpdate

TINY = HOVERNET
STEPS = 8


@pytest.fixture
def pairs(crop_pair_dirs):
    return crop_pair_dirs


def _args(pairs, out, *extra) -> list[str]:
    return ["train", "--model", "hovernet", "--images", str(pairs[0]), "--labels", str(pairs[1]), "--steps",
            str(STEPS), "--out", str(out), "--batch-size", "1", "--crop", "64", "--val-fraction", "0", "--device",
            "cpu", "--seed", "1", "--config", json.dumps(TINY), *extra]


def _popen(args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "napari_nucsynth.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_signal_saves_and_resume_ends_like_an_uninterrupted_run(pairs, tmp_path):
    """Ctrl-C in a terminal: the run saves after the step, exits 130 and prints the command that continues it, and
    the continued run ends with the weights of an uninterrupted one. (SIGTERM takes the same path, exit status
    128 + the signal's number; its handling is tested in-process by ``test_stop_on_signal_handlers``.)"""
    full = _popen(_args(pairs, tmp_path / "full.pt"))
    # checkpoints every step, so the first file tells that a step is done; then Ctrl-C
    ck = tmp_path / "stopped.pt"
    proc, t0 = _popen(_args(pairs, ck, "--save-every", "1")), time.monotonic()
    while not ck.exists() and time.monotonic() - t0 < 120:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    assert ck.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]  # 130: stopped, and saved
    assert "SIGINT: stopping after this step" in stderr
    step = load_checkpoint(ck)["step"]
    assert 1 <= step < STEPS and f"stopped at step {step} of {STEPS}" in stdout
    resume = stdout.strip().splitlines()[-1].strip()  # the printed command that continues the run
    assert resume.startswith("nucsynth train") and resume.endswith(f"--resume {ck}")
    resumed = _popen(shlex.split(resume)[1:])
    out_full = full.communicate(timeout=120)
    assert full.returncode == 0, out_full[1][-2000:]
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"step {STEPS}/{STEPS}" in stdout  # the log line of the last step (stdout is not a terminal)
    got, ref = load_checkpoint(ck), load_checkpoint(tmp_path / "full.pt")["state_dict"]
    assert got["step"] == STEPS
    assert all(torch.equal(ref[k], got["state_dict"][k]) for k in ref)


def test_stop_on_signal_handlers():
    old = signal.getsignal(signal.SIGINT)
    with _StopOnSignal(announce=False) as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop() and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):  # but a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is old


def test_report_lines_and_bar(capsys):
    rep = _TrainReport(every=0, bar=False)
    for i in (3, 4, 5):  # a resumed run: it/s and ETA from this session's steps
        rep(TrainUpdate("step", i, 10, losses={"loss": 0.5}))
    rep(TrainUpdate("validation", 5, 10, metrics={"aji": 0.25, "val_step": 5}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 3/10, loss 0.5000"
    assert lines[2].startswith("step 5/10, loss 0.5000, ") and "it/s, ETA 0:" in lines[2]
    assert lines[3] == "step 5: validation aji 0.250"
    pytest.importorskip("tqdm")
    bar = _TrainReport(bar=True)
    for i in (1, 2):
        bar(TrainUpdate("step", i, 4, losses={"loss": 1.25}))
    bar.close()
    out = capsys.readouterr().out
    assert "2/4" in out and "loss 1.2500" in out and "step/s" in out


def test_config_option_errors(pairs, tmp_path, capsys):
    base = ["train", "--model", "hovernet", "--images", str(pairs[0]), "--labels", str(pairs[1]), "--steps", "1",
            "--out", str(tmp_path / "m.pt")]
    for cfg, msg in (("[1, 2]", "neither"), ("{bad", "not valid JSON"), (str(tmp_path / "none.json"), "neither")):
        assert main([*base, "--config", cfg]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1]")
    assert main([*base, "--config", str(tmp_path / "list.json")]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_model_joint_wiring(pairs, tmp_path, monkeypatch, capsys):
    base = ["train", "--images", str(pairs[0]), "--labels", str(pairs[1]), "--steps", "3", "--out",
            str(tmp_path / "j.pt")]
    assert main([*base, "--model", "joint", "--generator", "adain"]) == 2
    assert "--segmenter" in capsys.readouterr().err
    assert main([*base, "--model", "hovernet", "--generator", "adain"]) == 2
    assert "for --model joint" in capsys.readouterr().err
    calls = []

    def fake(generator, segmenter, images, labels, **kw):
        calls.append((generator, segmenter, kw))
        return TrainResult(path=kw["out"], step=kw["steps"], stopped=False, metrics={}, seconds=0.0)

    from napari_nucsynth.train import joint

    monkeypatch.setattr(joint, "train_joint", fake)
    cfg = json.dumps({"generator": {"width": 4}, "segmenter": TINY})
    seg_ck = tmp_path / "seg.pt"
    seg_ck.write_bytes(b"")  # only passed on (train_joint is faked)
    assert main([*base, "--model", "joint", "--generator", "sian", "--segmenter", "hovernet", "--adversarial", "acgan",
                 "--config", cfg, "--save-every", "5", "--segmenter-checkpoint", str(seg_ck), "--segmenter-lr",
                 "2e-4", "--pretrain-steps", "2", "0"]) == 0
    (g, s, kw), = calls
    assert (g, s, kw["adversarial"], kw["steps"], kw["save_every"]) == ("sian", "hovernet", "acgan", 3, 5)
    assert kw["segmenter_checkpoint"] == seg_ck and kw["generator_checkpoint"] is None
    assert kw["segmenter_lr"] == 2e-4 and list(kw["pretrain_steps"]) == [2, 0]
    assert kw["generator_config"] == {"width": 4} and kw["segmenter_config"] == TINY and callable(kw["should_stop"])
    assert "wrote" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "napari_nucsynth.train.joint", None)  # an installation without the module
    assert main([*base, "--model", "joint", "--generator", "sian", "--segmenter", "hovernet"]) == 2
    assert "lacks" in capsys.readouterr().err


def test_init_fine_tunes_from_a_checkpoint(pairs, tmp_path, capsys):
    from napari_nucsynth.models import load_checkpoint

    base = ["train", "--model", "hovernet", "--images", str(pairs[0]), "--labels", str(pairs[1]), "--crop", "64",
            "--batch-size", "1", "--val-fraction", "0", "--device", "cpu", "--config", json.dumps(TINY)]
    first, tuned = tmp_path / "first.pt", tmp_path / "tuned.pt"
    assert main([*base, "--steps", "2", "--out", str(first)]) == 0
    assert main([*base, "--steps", "1", "--out", str(tuned), "--init", str(first)]) == 0
    a, b = load_checkpoint(first, kind="hovernet"), load_checkpoint(tuned, kind="hovernet")
    assert b["step"] == 1  # a new run (its own step count and schedule), from the first one's weights
    assert b["config"] == a["config"]
    keys = [k for k, v in a["state_dict"].items() if v.is_floating_point()]
    va = np.concatenate([a["state_dict"][k].numpy().ravel() for k in keys])
    vb = np.concatenate([b["state_dict"][k].numpy().ravel() for k in keys])
    change = np.linalg.norm(vb - va) / np.linalg.norm(va)
    assert 0 < change < 0.05, change  # one small step on from the first run's weights, not a fresh network
    assert a["train_data"]["augment"] == "basic"
    assert main([*base, "--steps", "1", "--out", str(tuned), "--augment", "strong"]) == 0
    assert load_checkpoint(tuned, kind="hovernet")["train_data"]["augment"] == "strong"
    assert main([*base, "--steps", "2", "--out", str(tuned), "--resume", str(tuned)]) == 0  # keeps the run's own
    assert load_checkpoint(tuned, kind="hovernet")["train_data"]["augment"] == "strong"
    capsys.readouterr()
    for extra, msg in (([ "--init", str(tmp_path / "missing.pt")], "checkpoint not found"),
                       (["--model", "maskrcnn", "--init", "default"], "ships no trained model"),
                       (["--segmenter-lr", "1e-4"], "for --model joint only"),
                       (["--model", "joint", "--augment", "strong"], "basic augmentation only")):
        assert main([*base, "--steps", "1", "--out", str(tmp_path / "x.pt"), *extra]) == 2
        assert msg in capsys.readouterr().err


def test_resume_command_keeps_arguments():
    from pathlib import Path

    from napari_nucsynth.cli import _resume_command

    cmd = _resume_command(["train", "--model", "hovernet", "--resume", "old.pt", "--out", "a b.pt"], Path("a b.pt"))
    assert cmd == "nucsynth train --model hovernet --out 'a b.pt' --resume 'a b.pt'"
    assert np.array_equal(shlex.split(cmd)[-2:], ["--resume", "a b.pt"])


def test_synthetic_mixing_is_recipe_b(pairs, load_tile, tmp_path, capsys, monkeypatch):
    """``--synthetic N`` (train(synthetic=N)): N pairs made from the training pairs alone join the crops' sources
    (and only the training side: validation stays real); recorded in the checkpoint; clear errors."""
    import napari_nucsynth.train as tr

    seen = []
    real_augment = tr._augment

    def spy(img, lab, crop, rng, augment):
        seen.append(img.shape[:2])
        return real_augment(img, lab, crop, rng, augment)

    monkeypatch.setattr(tr, "_augment", spy)
    base = ["train", "--model", "hovernet", "--images", str(pairs[0]), "--labels", str(pairs[1]), "--crop", "64",
            "--batch-size", "4", "--device", "cpu", "--config", json.dumps(TINY)]
    out = tmp_path / "mix.pt"
    assert main([*base, "--steps", "3", "--out", str(out), "--val-fraction", "0", "--synthetic", "3",
                 "--synthetic-size", "128"]) == 0
    ck = load_checkpoint(out, kind="hovernet")
    syn = ck["train_data"]["synthetic_pairs"]
    assert syn["n"] == 3 and syn["size"] == 128 and syn["renderer"] == "classic"
    assert (128, 128) in seen and (96, 96) in seen  # crops from synthetic and real images both
    # validation stays real: of three real images one is held out, and only the training side gets the pairs
    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")
    imgs = [img[:160, i * 160 : i * 160 + 160] for i in range(3)]
    labs = [lab[:160, i * 160 : i * 160 + 160] for i in range(3)]
    seen.clear()
    res = tr.train("hovernet", imgs, labs, steps=2, out=tmp_path / "api.pt", config=TINY, device="cpu",
                   batch_size=4, crop=64, val_fraction=0.34, eval_every=100, synthetic=2, synthetic_size=112)
    data = load_checkpoint(res.path, kind="hovernet")["train_data"]
    assert data["n_val"] == 1 and data["n_train"] == 2 and data["synthetic_pairs"]["n"] == 2
    assert (112, 112) in seen and (160, 160) in seen
    capsys.readouterr()
    for extra, msg in ((["--synthetic-renderer", "nope", "--synthetic", "1"], "unknown renderer"),
                       (["--model", "joint", "--generator", "sian", "--segmenter", "hovernet", "--synthetic", "1"],
                        "joint loop makes its own"),
                       (["--synthetic", "-1"], "non-negative")):
        assert main([*base, "--steps", "1", "--out", str(tmp_path / "x.pt"), *extra]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a generator"):
        tr.train("sian", str(pairs[0]), str(pairs[1]), steps=1, out=tmp_path / "g.pt", synthetic=1)
