"""Starting runs from trained weights: ``task.finetune_from`` (step 0, fresh optimiser and
schedule, weights and EMA loaded) and a DEQ started from an explicit EquiformerV2."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script, make_config, run_cli

LR = 1e-9  # fine-tuning steps that leave the weights where they were loaded


def parameter_names(checkpoint) -> list[str]:
    """Trainable parameter names, in order, of the model rebuilt from a checkpoint's config
    (the EMA keeps one shadow per trainable parameter, in this order)."""
    import ocp_deq  # noqa: F401
    from fairchem.core.common.registry import registry

    model_config = dict(checkpoint["config"]["model"])
    model = registry.get_model_class(model_config.pop("name"))(**model_config)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load(path) -> dict:
    """A checkpoint with its state dict's keys as the model names them (fairchem saves
    the wrapped model's: 'module.' in front)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    return checkpoint


def checkpoint_of(run_dir, name="checkpoint.pt"):
    [path] = (run_dir / "checkpoints").glob(f"*/{name}")
    return path, load(path)


def steps_per_epoch(toy_root, batch_size=4):
    from ocp_deq.data import read_lmdb

    return -(-len(read_lmdb(toy_root / "train")) // batch_size)


def test_finetune_from_starts_at_step_zero_with_the_loaded_weights_and_ema(trained_deq, toy_root, tmp_path):
    """The README's direct -> conservative fine-tuning: the conservative run trains all but
    the (unused, frozen) direct force head, so the EMA is re-indexed by parameter name."""
    work, config, _, source_path = trained_deq
    source = load(source_path)
    assert source["step"] > steps_per_epoch(toy_root) and source["ema"] is not None
    assert source["config"]["model"].get("force_mode", "direct") == "direct"
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path, "--identifier", "ft",
                   "--seed", "7", f"task.finetune_from={source_path}", "optim.max_epochs=1",
                   "model.force_mode=conservative", f"optim.lr_initial={LR}", cwd=work)
    log = proc.stdout + proc.stderr
    assert f"ocp_deq: fine-tuning from {source_path}: weights, EMA," in log
    _, tuned = checkpoint_of(tmp_path)
    assert tuned["step"] == steps_per_epoch(toy_root)  # a fresh run of one epoch, not the source's count
    adam_steps = {float(state["step"]) for state in tuned["optimizer"]["state"].values()}
    assert adam_steps == {float(tuned["step"])}  # a fresh optimiser: no moments carried over
    for key, value in source["state_dict"].items():  # another seed, yet the source's weights
        torch.testing.assert_close(tuned["state_dict"][key], value, atol=1e-6, rtol=0)
    # the EMA went on from the source's: after k steps on (fixed) weights w, shadow - w = decay^k (source shadow - w)
    decay = tuned["config"]["optim"]["ema_decay"]
    old_shadows = dict(zip(parameter_names(source), source["ema"]["shadow_params"], strict=True))
    trainable = parameter_names(tuned)
    assert len(trainable) < len(old_shadows) and not any(".output_heads.forces." in f".{n}" for n in trainable)
    moved = 0.0
    for name, shadow in zip(trainable, tuned["ema"]["shadow_params"], strict=True):
        old, w = old_shadows[name], source["state_dict"][name]
        torch.testing.assert_close(shadow - w, decay ** tuned["step"] * (old - w), atol=1e-6, rtol=1e-4)
        moved = max(moved, float((old - w).abs().max()))
    assert moved > 1e-3  # the source's EMA differs from its weights: the check can fail


def test_finetune_from_names_a_missing_or_unsafe_file(trained_deq, tmp_path, capsys):
    """Checked before fairchem starts (in this process: main.py calls the same main)."""
    from ocp_deq.cli import main

    _, config, _, _ = trained_deq
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "nothing.pt", f"task.finetune_from: no file '{tmp_path / 'nothing.pt'}'"),
                          (tmp_path / "junk.pt", f"task.finetune_from: refusing to load checkpoint {tmp_path / 'junk.pt'}")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir", str(tmp_path / "run"),
                  f"task.finetune_from={path}"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def explicit_run(toy_root, tmp_path_factory):
    """A tiny 3-block explicit EquiformerV2 trained one epoch through the CLI."""
    work = tmp_path_factory.mktemp("explicit")
    config = make_config(work, toy_root, "equiformer_v2_toy.yml", model={"num_layers": 3})
    run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", work / "run", "--identifier", "e", cwd=work)
    path, checkpoint = checkpoint_of(work / "run")
    return work, path, checkpoint


def deq_from_explicit(capsys, *args) -> tuple[int, str, str]:
    """scripts/deq_from_explicit.py in this process: (exit code, stdout, stderr)."""
    try:
        code = load_script("deq_from_explicit").main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_deq_started_from_explicit_weights_trains(explicit_run, toy_root, tmp_path, capsys):
    from ocp_deq.models.from_explicit import hydra_name

    work, explicit_path, explicit = explicit_run
    config = make_config(tmp_path, toy_root)
    start = tmp_path / "start.pt"
    code, out, _ = deq_from_explicit(capsys, explicit_path, "--config-yml", config, "--blocks", "1", "-o", start)
    assert code == 0 and "EMA weights of a 3-block explicit model; f <- explicit block(s) [1]" in out
    assert "backbone.deq_update_gain" in out and "kept from initialisation" in out
    deq = load(start)
    # independent of the mapping code: the EMA shadows in the order of the explicit model's parameters
    ema = dict(zip(parameter_names(explicit), explicit["ema"]["shadow_params"], strict=True))
    hydra = {hydra_name(k): v for k, v in ema.items()}
    expected = {k.replace("backbone.blocks.1.", "backbone.blocks.0."): v for k, v in hydra.items()
                if not k.startswith("backbone.blocks.") or k.startswith("backbone.blocks.1.")}
    assert len(expected) > 80  # every parameter of encoder, one block, norm and heads
    for key, value in expected.items():
        assert torch.equal(deq["state_dict"][key], value), key
    assert deq["normalizers"].keys() == explicit["normalizers"].keys()
    # the start holds weights only: fairchem alone would switch EMA off; it restarts from the weights
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run",
                   "--identifier", "d", f"task.finetune_from={start}", f"optim.lr_initial={LR}", cwd=tmp_path)
    assert f"ocp_deq: fine-tuning from {start}: weights, EMA from the weights" in proc.stdout + proc.stderr
    assert "forces_mae" in proc.stdout + proc.stderr
    _, tuned = checkpoint_of(tmp_path / "run")
    weights = [tuned["state_dict"][name] for name in parameter_names(tuned)]
    for shadow, w in zip(tuned["ema"]["shadow_params"], weights, strict=True):
        torch.testing.assert_close(shadow, w, atol=1e-6, rtol=0)
    for key, value in deq["state_dict"].items():  # and the run started from the mapped weights
        torch.testing.assert_close(tuned["state_dict"][key], value, atol=1e-6, rtol=0)
    # the same explicit model in fairchem's other layouts: its published one (model name +
    # model_attributes) gives the same start; its hydra conversion (which drops the EMA) the trained weights
    from fairchem.core.models.equiformer_v2.eqv2_to_eqv2_hydra import convert_checkpoint_and_config_to_hydra

    published = dict(explicit, config=dict(explicit["config"]))
    published["config"]["model_attributes"] = dict(published["config"]["model"])
    published["config"]["model"] = published["config"]["model_attributes"].pop("name")
    torch.save(published, tmp_path / "published.pt")
    convert_checkpoint_and_config_to_hydra(str(work / "test_equiformer_v2_toy.yml"), str(explicit_path),
                                           str(tmp_path / "hydra.yml"), str(tmp_path / "hydra.pt"))
    trained = {hydra_name(k).replace("backbone.blocks.1.", "backbone.blocks.0."): v
               for k, v in explicit["state_dict"].items()
               if not hydra_name(k).startswith("backbone.blocks.") or hydra_name(k).startswith("backbone.blocks.1.")}
    for source, reference in (("published.pt", expected), ("hydra.pt", trained)):
        assert deq_from_explicit(capsys, tmp_path / source, "--config-yml", config, "--blocks", "1",
                                 "-o", tmp_path / f"from_{source}")[0] == 0
        state = load(tmp_path / f"from_{source}")["state_dict"]
        for key, value in reference.items():
            assert torch.equal(state[key], value), (source, key)
    # the wrong width is refused by name
    (tmp_path / "wide").mkdir()
    wider = make_config(tmp_path / "wide", toy_root, model={"sphere_channels": 24})
    code, _, err = deq_from_explicit(capsys, explicit_path, "--config-yml", wider, "-o", tmp_path / "x.pt")
    assert code == 2 and "differs from the explicit" in err and not (tmp_path / "x.pt").exists()

