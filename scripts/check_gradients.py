"""Gradient checks behind the README's figures, stored: IFT vs unrolled backprop (BPTT) and
central finite differences, phantom gradients vs IFT, and conservative forces vs finite
differences of the energy, with and without the edge-frame derivative
(``ocp_deq/models/edge_frames.py``).

Runs the float64 molecule set-up of tests/test_gradients.py (a random DEQ, all-pairs graph,
tight solves); the tests assert tolerances, this script records the measured values.

    python scripts/check_gradients.py --out docs/benchmarks/gradients.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))
import ocp_deq  # noqa: E402,F401  (before fairchem)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_gradients import build, conservative_force_error, finite_difference_parameter_error, param_grad  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gradients.json")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    grads = {mode: param_grad(build(mode)) for mode in ("ift", "bptt", "phantom")}
    ift = build("ift")
    result = {
        "setup": "float64, random DEQ (8 channels, lmax 2, 1 block in f) on a 6-atom molecule, all-pairs graph",
        "ift_vs_bptt_relative_error": float((grads["ift"] - grads["bptt"]).norm() / grads["ift"].norm()),
        "ift_vs_finite_differences_max_relative_error": finite_difference_parameter_error(ift, param_grad(ift)),
        "phantom_vs_ift_cosine": float(F.cosine_similarity(grads["ift"], grads["phantom"], dim=0)),
        "phantom_vs_ift_relative_error": float((grads["phantom"] - grads["ift"]).norm() / grads["ift"].norm()),
        "conservative_forces_vs_finite_differences": conservative_force_error(build("ift", force_mode="conservative").eval()),
    }
    # fairchem's edge frames detached from the positions, as without ocp_deq/models/edge_frames.py
    with mock.patch("ocp_deq.models.deq_equiformer_v2.attach_position_gradient", lambda *args: None):
        result["conservative_forces_vs_finite_differences_without_edge_frame_derivative"] = conservative_force_error(
            build("ift", force_mode="conservative").eval())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for key, value in result.items():
        print(f"{key}: {value if isinstance(value, str) else f'{value:.3e}'}")


if __name__ == "__main__":
    main()
