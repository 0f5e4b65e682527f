"""Summarise training runs from their tensorboard logs: the last validation (EMA weights),
training-solve statistics over the last epoch and the run's wall time, one entry per run.

    python scripts/summarise_runs.py runs/readme/logs/tensorboard/*deq_toy runs/readme/logs/tensorboard/*explicit_toy \
        --out docs/benchmarks/toy_run.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def summarise(log_dir: Path) -> dict:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if not tags:
        raise SystemExit(f"{log_dir}: no tensorboard scalars (not a fairchem run's log folder?)")
    scalars = {tag: events.Scalars(tag) for tag in tags}
    every = [event for series in scalars.values() for event in series]
    result = {"run": log_dir.name, "steps": max(event.step for event in every),
              "wall_time_s": round(max(e.wall_time for e in every) - min(e.wall_time for e in every), 1),
              "validations": len(scalars.get("val/forces_mae", []))}
    result["final_validation"] = {tag[4:]: series[-1].value for tag, series in scalars.items() if tag.startswith("val/")}
    if "train/epoch" in scalars:  # training-solve statistics over the last epoch
        epochs = scalars["train/epoch"]
        last_epoch_start = next(e.step for e in epochs if e.value > epochs[-1].value - 1)
        result["last_epoch_training"] = {
            tag[6:]: sum(e.value for e in series if e.step >= last_epoch_start) / sum(1 for e in series if e.step >= last_epoch_start)
            for tag, series in scalars.items() if tag.startswith("train/deq_") or tag == "train/forces_mae"}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dirs", nargs="+", type=Path, help="tensorboard folders (<run-dir>/logs/tensorboard/<id>)")
    parser.add_argument("--out", type=Path, help="write the summaries here (JSON)")
    args = parser.parse_args(argv)
    summaries = [summarise(path) for path in args.log_dirs]
    text = json.dumps(summaries, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
