"""Score fairchem S2EF predictions (or, with --is2re, relaxed energies) on labelled LMDBs
with the OC20 leaderboard metrics.

  python scripts/evaluate_s2ef.py --split val_id results/<ts>-val_id/ocp_predictions.npz data/s2ef/all/val_id
  python scripts/evaluate_s2ef.py --predictions P.npz --lmdb data/toy_s2ef/val --json metrics.json
  python scripts/evaluate_s2ef.py --is2re --predictions results/<split>/trajectories --lmdb data/toy_s2ef/relax

Prints a markdown table per split (and the unweighted mean over splits, as the leaderboard
averages them). --predictions/--lmdb pairs are named after the LMDB file or folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ocp_deq.leaderboard import evaluate_is2re, evaluate_s2ef  # noqa: E402  (imports ocp_deq before fairchem)

COLUMNS = (("energy_mae", "energy MAE [eV]"), ("forces_mae", "force MAE [eV/Å]"),
           ("forces_cos", "force cos"), ("efwt", "EFwT"), ("n_systems", "n systems"))
IS2RE_COLUMNS = (("energy_mae", "energy MAE [eV]"), ("energy_mse", "energy MSE [eV²]"), ("ewt", "EwT"),
                 ("n_systems", "n systems"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", action="append", default=[], metavar="NPZ",
                        help="ocp_predictions.npz (pair with --lmdb, repeatable); with --is2re a relaxation's "
                             "trajectory folder (task.relax_opt.traj_dir) or an npz of ids and energy")
    parser.add_argument("--lmdb", action="append", default=[], metavar="PATH",
                        help="labelled LMDB file or folder for the matching --predictions")
    parser.add_argument("--split", action="append", nargs=3, default=[], metavar=("NAME", "PRED", "LMDB"),
                        help="a named split (repeatable)")
    parser.add_argument("--is2re", action="store_true",
                        help="IS2RE: relaxed energies against y_relaxed (energy MAE, EwT by fairchem's Evaluator)")
    parser.add_argument("--json", metavar="OUT", help="also write the metrics as JSON {split: {metric: value}}")
    return parser.parse_args(argv)


def markdown_table(results: dict[str, dict], columns=COLUMNS) -> str:
    rows = ["| split | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[key]:.4f}" if key != "n_systems" else str(metrics[key]) for key, _ in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    evaluate, columns = (evaluate_is2re, IS2RE_COLUMNS) if args.is2re else (evaluate_s2ef, COLUMNS)
    try:
        if len(args.predictions) != len(args.lmdb):
            raise ValueError(f"{len(args.predictions)} --predictions but {len(args.lmdb)} --lmdb: give them in pairs")
        jobs = [tuple(split) for split in args.split]
        jobs += [(Path(lmdb).name.removesuffix(".lmdb"), pred, lmdb) for pred, lmdb in zip(args.predictions, args.lmdb)]
        if not jobs:
            raise ValueError("nothing to evaluate: give --split NAME PRED LMDB or --predictions/--lmdb pairs")
        names = [name for name, _, _ in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"split names must be unique, got {names} (use --split NAME PRED LMDB)")
        results = {name: evaluate(pred, lmdb) for name, pred, lmdb in jobs}
    except (ValueError, OSError) as exc:  # SubmissionError is a ValueError
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    table = dict(results)
    if len(results) > 1:
        mean = {key: sum(m[key] for m in results.values()) / len(results) for key, _ in columns if key != "n_systems"}
        table["mean"] = {**mean, "n_systems": sum(m["n_systems"] for m in results.values())}
    print(markdown_table(table, columns))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
