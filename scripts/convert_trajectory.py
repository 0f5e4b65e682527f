"""Convert an MD trajectory or a multi-system DFT set (sGDML .npz, extended XYZ, ASE .traj
or .db) into OCP LMDBs.

    python scripts/convert_trajectory.py md17_aspirin.npz -o data/md17/aspirin            # 950/50/rest, random
    python scripts/convert_trajectory.py run.xyz -o data/run --split ordered --train 800 --val 100 --test 100
    python scripts/convert_trajectory.py rmd17_aspirin.npz -o data/rmd17/aspirin --positions-key coords \\
        --numbers-key nuclear_charges --energy-key energies --forces-key forces --energy-unit kcal/mol
    # many systems: one sid per value of a db column / atoms.info key, split by system (sizes count systems)
    python scripts/convert_trajectory.py dft.db -o data/custom --sid-key system_id --train 40 --val 5 --test 5
    python scripts/convert_trajectory.py dft.xyz -o data/custom --sid-per row --train 400 --val 50  # a sid per frame

Writes OUT/train/data.lmdb, OUT/val/data.lmdb, OUT/test/data.lmdb (point a fairchem config's
dataset.{train,val,test}.src at those folders) and OUT/conversion.json. Split modes and
fields: see ocp_deq/data/splits.py and ocp_deq/data/converters.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ocp_deq  # noqa: E402,F401  (before fairchem / torch_geometric: stand-ins)
from ocp_deq.data.converters import FORMATS, SID_PER, ConversionError, convert_trajectory  # noqa: E402
from ocp_deq.data.splits import SPLIT_BY, SPLIT_MODES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="trajectory file")
    parser.add_argument("-o", "--out", required=True, help="output folder (gets train/ val/ test/)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="default: from the extension")
    parser.add_argument("--split", choices=SPLIT_MODES, default="random")
    parser.add_argument("--train", type=int, default=950, help="training frames (default 950)")
    parser.add_argument("--val", type=int, default=50, help="validation frames (default 50)")
    parser.add_argument("--test", type=int, default=None, help="test frames (default: all the rest)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (random / overlapping)")
    parser.add_argument("--sid", help="system id of a one-trajectory file (an integer, or a name; default 0)")
    sids = parser.add_mutually_exclusive_group()
    sids.add_argument("--sid-per", choices=SID_PER, default="file",
                      help="file: the file is one trajectory (default); row: every row / frame is its own system")
    sids.add_argument("--sid-key", metavar="NAME", help="one system per value of this db column / atoms.info key "
                      "(npz: array key); fids number each system's frames")
    parser.add_argument("--split-by", choices=SPLIT_BY, help="system: no system in two splits, sizes count systems "
                        "(default with --sid-per row / --sid-key); frame: frames drawn independently")
    parser.add_argument("--periodic-vacuum", type=float, metavar="A", help="make every row periodic, with A "
                        "Angstrom of vacuum in its non-periodic directions (>= the model cutoff); needed when a "
                        "set mixes periodic and non-periodic rows")
    parser.add_argument("--energy-unit", help="eV, meV, kcal/mol, kJ/mol, Hartree, Ry (default: the npz's "
                        "e_unit / the rows' energy_unit, else eV)")
    parser.add_argument("--force-unit", help="<energy>/<length>, e.g. kcal/mol/Ang (default: energy/length)")
    parser.add_argument("--length-unit", help="Ang, Bohr, nm (default: the npz's r_unit / the rows' length_unit, "
                        "else Ang)")
    for name, npz_key in (("positions", "R"), ("numbers", "z"), ("energy", "E"), ("forces", "F"), ("cell", "lattice")):
        ase_note = f"; ASE sources: default '{name}'" if name in ("energy", "forces") else ""
        parser.add_argument(f"--{name}-key", help=f"npz key of the {name} (default '{npz_key}'){ase_note}")
    parser.add_argument("--overwrite", action="store_true", help="replace existing LMDBs in OUT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    keys = {name: getattr(args, f"{name}_key") for name in ("positions", "numbers", "energy", "forces", "cell")}
    keys = {name: key for name, key in keys.items() if key is not None}
    sid = int(args.sid) if args.sid is not None and args.sid.lstrip("-").isdigit() else args.sid
    try:
        record = convert_trajectory(
            args.input, args.out, fmt=None if args.format == "auto" else args.format, split=args.split,
            n_train=args.train, n_val=args.val, n_test=args.test, seed=args.seed, sid=sid, sid_per=args.sid_per,
            sid_key=args.sid_key, split_by=args.split_by, periodic_vacuum=args.periodic_vacuum, keys=keys,
            energy_unit=args.energy_unit, force_unit=args.force_unit, length_unit=args.length_unit,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    units, factors = record["units"], record["factors_to_eV_A"]
    sids = {"file": f"sid {record['sid']!r}", "row": "a sid per row", "key": f"sid from key '{record['sid_key']}'"}
    print(f"read {record['frames']} frames from {record['source']} ({record['format']}): {record['systems']} "
          f"system(s), {sids[record['sid_per']]}; pbc {record['pbc']}")
    print(f"units: energy {units['energy']} (x{factors['energy']:.6g} -> eV), forces {units['forces']} "
          f"(x{factors['forces']:.6g} -> eV/A), positions {units['length']} (x{factors['length']:.6g} -> A)")
    split = record["split"]
    print(f"split: {split['mode']} by {split['by']}, seed {split['seed']}")
    for name, entry in record["written"].items():
        if entry["path"] is None:
            print(f"  {name:5s}: 0 frames (not written)")
            continue
        rows = entry["rows"]
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        print(f"  {name:5s}: {entry['frames']} frames of {entry['systems']} system(s) -> {entry['path']} "
              f"(rows {shown})")
    print(f"record: {Path(args.out) / 'conversion.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
