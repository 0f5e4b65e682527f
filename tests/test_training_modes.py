"""Training through fairchem's OCP trainer: every gradient mode learns, gradient clipping
bounds the update, and a direct-force checkpoint fine-tunes with conservative forces."""

from __future__ import annotations

import contextlib
import gc
import os
from unittest import mock

import pytest
import torch
import yaml
from fairchem.core.common import distutils
from fairchem.core.common.flags import flags
from fairchem.core.common.utils import build_config, new_trainer_context

from conftest import make_config, run_cli
from ocp_deq.data import read_lmdb, write_lmdb

# short solves keep each training step around a second on 2 cores
SHORT = {"train_solver": {"max_iter": 10}, "backward_solver": {"max_iter": 10}}


@pytest.fixture(autouse=True)
def one_thread_and_collect_trainers():
    """One thread: tiny tensors only lose time to a second one (~100x on a busy CPU).
    A trainer sits in a reference cycle and keeps its LMDB files open until collected;
    LMDB refuses to open a file twice in one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    gc.collect()


@contextlib.contextmanager
def ocp_trainer(config_path, run_dir):
    """The trainer of ``main.py --mode train``, built in-process by fairchem's
    ``new_trainer_context`` from the same flags and config."""
    gc.collect()  # close the LMDB files of an earlier trainer of the same test
    argv = ["--mode", "train", "--config-yml", str(config_path), "--cpu", "--run-dir", str(run_dir), "--debug"]
    args, overrides = flags.get_parser().parse_known_args(argv)
    config = build_config(args, overrides)
    with mock.patch.dict(os.environ):  # setup_env_local sets rank variables
        distutils.setup_env_local()
        with new_trainer_context(config=config) as ctx:
            yield ctx.trainer


def train_step(trainer, batch, seed=0):
    """One OCPTrainer step (forward, loss, backward, clip, optimiser step); returns the loss.

    Same seed for every step: EquiformerV2's random edge rolls then do not change the loss."""
    trainer.model.train()
    torch.manual_seed(seed)
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    trainer._backward(loss)
    return loss.item()


@pytest.mark.parametrize("gradient", ["phantom", "ift", "bptt"])
def test_each_gradient_mode_lowers_the_loss_on_a_fixed_batch(gradient, toy_root, tmp_path):
    config = make_config(tmp_path, toy_root, model={"deq": {"gradient": gradient, **SHORT}},
                         optim={"batch_size": 2, "lr_initial": 0.01, "scheduler": "Null"})
    with ocp_trainer(config, tmp_path / "run") as trainer:
        assert trainer._unwrapped_model.backbone.deq_settings.gradient == gradient
        batch = next(iter(trainer.train_loader))
        losses = [train_step(trainer, batch) for _ in range(4)]
    # losses[k] is the loss after k optimiser steps on this batch
    print(f"{gradient}: training losses {losses}")
    assert losses[-1] < 0.8 * losses[0], losses


def parameter_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


def sgd_update(toy_root, directory, clip):
    """Parameter change of one plain-SGD step through the trainer with ``optim.clip_grad_norm``."""
    config = make_config(directory, toy_root, optim={
        "batch_size": 2, "optimizer": "SGD", "optimizer_params": {}, "lr_initial": 0.1,
        "scheduler": "Null", "clip_grad_norm": clip,
    })
    with ocp_trainer(config, directory / "run") as trainer:
        batch = next(iter(trainer.train_loader))
        before = parameter_vector(trainer)
        train_step(trainer, batch)
        return before, parameter_vector(trainer) - before


def test_clip_grad_norm_bounds_the_update(toy_root, tmp_path):
    clip, lr = 1e-3, 0.1
    (tmp_path / "clip").mkdir()
    (tmp_path / "free").mkdir()
    start_clipped, clipped = sgd_update(toy_root, tmp_path / "clip", clip)
    start_free, free = sgd_update(toy_root, tmp_path / "free", None)
    torch.testing.assert_close(start_clipped, start_free)  # same seed, same initial model
    # SGD: update = -lr * gradient, so |update| / lr is the norm of the gradient it used
    print(f"gradient norm without clipping {free.norm() / lr:.3g}, with clip {clip}: {clipped.norm() / lr:.3g}")
    assert clipped.norm() / lr == pytest.approx(clip, rel=1e-4)
    assert free.norm() / lr > 100 * clip
    # clipping rescales the same gradient: same direction
    assert torch.nn.functional.cosine_similarity(clipped, free, dim=0) > 0.9999


def small_splits(toy_root, directory):
    """8 training and 4 validation frames: two training steps per epoch."""
    for split, n in (("train", 8), ("val", 4)):
        write_lmdb(directory / split / "data.lmdb", read_lmdb(toy_root / split)[:n])
    return directory


def test_direct_checkpoint_fine_tunes_with_conservative_forces(toy_root, tmp_path):
    data = small_splits(toy_root, tmp_path / "data")
    config = make_config(tmp_path, toy_root, model={"force_mode": "direct", "deq": SHORT},
                         optim={"lr_initial": 0.01})
    settings = yaml.safe_load(config.read_text())
    settings["dataset"] = {split: settings["dataset"][split] | {"src": str(data / split)} for split in ("train", "val")}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))

    run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "pre", "--identifier", "pre",
            cwd=tmp_path)
    [pretrained] = (tmp_path / "pre" / "checkpoints").glob("*/best_checkpoint.pt")
    # best_checkpoint.pt holds weights without trainer state: training restarts at step 0.
    # Another seed: a freshly initialised model would differ from the checkpoint everywhere.
    lr = 1e-5
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "ft",
                   "--identifier", "ft", "--checkpoint", pretrained, "--seed", "7",
                   "model.force_mode=conservative", f"optim.lr_initial={lr}", cwd=tmp_path)
    assert f"Loading checkpoint from: {pretrained}" in proc.stdout + proc.stderr
    # the IFT backward solve behind conservative forces is watched like the forward solve
    assert "deq_backward_unconverged" in proc.stdout + proc.stderr
    assert "with an unconverged force (IFT backward) solve" in proc.stdout + proc.stderr
    [tuned] = (tmp_path / "ft" / "checkpoints").glob("*/checkpoint.pt")

    before = torch.load(pretrained, map_location="cpu", weights_only=False)
    after = torch.load(tuned, map_location="cpu", weights_only=False)
    assert after["config"]["model"]["force_mode"] == "conservative"
    assert after["step"] == 2  # a fresh run of one epoch, not a resumed one
    force_head = [k for k in before["state_dict"] if ".output_heads.forces." in k]
    blocks = [k for k in before["state_dict"] if ".backbone.blocks." in k]
    assert force_head and blocks
    # conservative forces never use the direct force head: it receives no gradient
    for key in force_head:
        torch.testing.assert_close(after["state_dict"][key], before["state_dict"][key], rtol=0, atol=0)
    # the blocks train (on -dE/dpos), starting from the loaded weights: two AdamW steps of
    # lr 1e-5 move each weight by a few lr at most
    change = max((after["state_dict"][k] - before["state_dict"][k]).abs().max().item() for k in blocks)
    print(f"largest block-weight change in fine-tuning: {change:.2e}")
    assert 0 < change < 10 * 2 * lr

    # checkpoint.pt holds the trainer state: the run resumes at step 2 with the EMA re-indexed
    # to the conservative model's trainable parameters and a fresh optimiser (its parameter
    # groups no longer match the saved ones)
    [resumable] = (tmp_path / "pre" / "checkpoints").glob("*/checkpoint.pt")
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "ft2",
                   "--identifier", "ft2", "--checkpoint", resumable, "model.force_mode=conservative",
                   "optim.max_epochs=2", f"optim.lr_initial={lr}", cwd=tmp_path)
    assert "its optimizer state is not restored" in proc.stdout + proc.stderr
    [resumed] = (tmp_path / "ft2" / "checkpoints").glob("*/checkpoint.pt")
    saved = torch.load(resumable, map_location="cpu", weights_only=False)
    after = torch.load(resumed, map_location="cpu", weights_only=False)
    assert after["step"] == 4
    saved_ema, resumed_ema = saved["ema"]["shadow_params"], after["ema"]["shadow_params"]
    assert 0 < len(saved_ema) - len(resumed_ema) <= len(force_head)
    # the force head's parameters come last: every other shadow keeps its value (two steps of
    # lr 1e-5 and decay 0.999 move it by far less than 1e-3)
    for kept, saved_shadow in zip(resumed_ema, saved_ema):
        torch.testing.assert_close(kept, saved_shadow, rtol=0, atol=1e-3)
