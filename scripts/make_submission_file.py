"""Merge per-split fairchem predictions into one EvalAI OC20 submission, or check one.

  python scripts/make_submission_file.py --id A.npz --ood-ads B.npz --ood-cat C.npz --ood-both D.npz --out s2ef.npz
  python scripts/make_submission_file.py --results-dir runs/results --out s2ef.npz
  python scripts/make_submission_file.py --is2rs --results-dir runs/relax/results --out is2rs.npz
  python scripts/make_submission_file.py --is2re --results-dir runs/relax/results --out is2re.npz
  python scripts/make_submission_file.py --validate s2ef.npz   (--is2rs / --is2re: as that track)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ocp_deq import leaderboard as lb  # noqa: E402  (imports ocp_deq before fairchem)

RESULTS_DIR_HELP = (
    "fairchem's <run-dir>/results folder. Predict each test split with --identifier <split> "
    "(id, ood_ads, ood_cat, ood_both); fairchem then writes results/<timestamp>-<split>/"
    "ocp_predictions.npz (relaxed_positions.npz for --is2rs; for --is2re the relaxation trajectories, "
    "which fairchem writes only when told where: task.relax_opt.traj_dir=<run-dir>/results/<split>/trajectories). "
    "Plain results/<split>/ folders work too. Exactly one folder per split must match."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for split in lb.SPLITS:
        flag = "--" + split.replace("_", "-")
        parser.add_argument(flag, dest=split, metavar="PATH",
                            help=f"the {split} split's ocp_predictions.npz (relaxed_positions.npz with --is2rs, "
                                 "its folder of <sid>.traj relaxation trajectories with --is2re)")
    parser.add_argument("--results-dir", metavar="DIR", help=RESULTS_DIR_HELP)
    parser.add_argument("--out", metavar="FILE",
                        help="submission npz to write (atomically: an existing file is kept on error)")
    parser.add_argument("--float32", action="store_true", help="S2EF energies and forces in float32 (default float16)")
    track = parser.add_mutually_exclusive_group()
    track.add_argument("--is2rs", action="store_true",
                       help="IS2RS relaxed positions (written in float32) instead of S2EF")
    track.add_argument("--is2re", action="store_true",
                       help="IS2RE relaxed energies (each trajectory's last frame, as fairchem's --is2re-relaxations)")
    parser.add_argument("--validate", metavar="FILE",
                        help="only check FILE as a submission (with --is2rs / --is2re: as that track)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    explicit = {split: getattr(args, split) for split in lb.SPLITS if getattr(args, split)}
    track = "IS2RS" if args.is2rs else "IS2RE" if args.is2re else "S2EF"
    try:
        if args.validate:
            if explicit or args.results_dir or args.out:
                raise ValueError("--validate takes only a file (and --is2rs or --is2re)")
            validate = {"S2EF": lb.validate_s2ef_submission, "IS2RS": lb.validate_is2rs_submission,
                        "IS2RE": lb.validate_is2re_submission}[track]
            warnings = validate(args.validate)
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
            print(f"{args.validate}: valid {track} submission"
                  + (f" with {len(warnings)} warning(s)" if warnings else ""))
            return 0
        if bool(explicit) == bool(args.results_dir):
            raise ValueError("give either --results-dir or all four of --id --ood-ads --ood-cat --ood-both")
        if not args.out:
            raise ValueError("--out FILE is required")
        if explicit and len(explicit) != len(lb.SPLITS):
            missing = [s for s in lb.SPLITS if s not in explicit]
            raise ValueError(f"missing --{' --'.join(s.replace('_', '-') for s in missing)}")
        filename = {"S2EF": "ocp_predictions.npz", "IS2RS": "relaxed_positions.npz", "IS2RE": "trajectories"}[track]
        files = explicit or lb.find_split_files(args.results_dir, filename)
        if args.is2rs:
            out = lb.merge_is2rs_predictions(files, args.out)
        elif args.is2re:
            out = lb.merge_is2re_relaxations(files, args.out)
        else:
            out = lb.merge_s2ef_predictions(files, args.out, dtype="float32" if args.float32 else "float16")
    except (ValueError, OSError) as exc:  # SubmissionError is a ValueError
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    for split in lb.SPLITS:
        print(f"{split}: {files[split]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
