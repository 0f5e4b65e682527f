"""Write a DEQ starting checkpoint from a trained explicit EquiformerV2 checkpoint.

    python scripts/deq_from_explicit.py runs/explicit/checkpoints/<ts>/best_checkpoint.pt \
        --config-yml deq_equiformer_v2_toy.yml --blocks 3 -o runs/deq_start.pt
    python main.py --mode train --config-yml deq_equiformer_v2_toy.yml task.finetune_from=runs/deq_start.pt

The DEQ is built from its config (overrides as on the OCP command line: model.num_layers=2
gives f two blocks, then --blocks takes two indices). Encoder, final norm and heads come from
the explicit model, f's blocks from the chosen explicit blocks (the last one by default: it
was trained to refine an already good representation, which is what f does at its fixed
point); the explicit model's normalisers and element references come along, as its
weights only make sense with them. The mapping is printed. The output holds weights only:
``task.finetune_from`` starts a run from it at step 0 with a fresh optimiser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import ocp_deq  # noqa: E402,F401  (before fairchem)
import torch  # noqa: E402
from fairchem.core.common.registry import registry  # noqa: E402
from fairchem.core.common.utils import create_dict_from_args, load_config, merge_dicts  # noqa: E402

from ocp_deq.cli import resolve_config  # noqa: E402
from ocp_deq.models.from_explicit import (  # noqa: E402
    MappingError, deq_state_from_explicit, explicit_weights, summarise_mapping)
from ocp_deq.trainers.checkpointing import CheckpointError, load_checkpoint_file  # noqa: E402


def build_deq(config_yml: str, overrides: list[str], seed: int):
    config, _, _ = load_config(str(resolve_config(config_yml)))
    config, _ = merge_dicts(config, create_dict_from_args(overrides))
    model_config = dict(config["model"])
    name = model_config.pop("name")
    if name != "deq_equiformer_v2":
        raise MappingError(f"{config_yml}: model.name is {name!r}, expected 'deq_equiformer_v2'")
    torch.manual_seed(seed)
    return registry.get_model_class(name)(**model_config), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("explicit", help="explicit equiformer_v2 checkpoint (old-style or hydra)")
    parser.add_argument("--config-yml", required=True, help="the DEQ config (path, or name under configs/)")
    parser.add_argument("--blocks", default="-1",
                        help="comma-separated explicit block indices for f's blocks (default -1: the last)")
    parser.add_argument("--no-ema", action="store_true", help="take the trained weights, not the EMA ones")
    parser.add_argument("--seed", type=int, default=0, help="initialisation of what has no explicit counterpart")
    parser.add_argument("-o", "--out", required=True, help="output checkpoint")
    args, overrides = parser.parse_known_args(argv)
    try:
        explicit = load_checkpoint_file(args.explicit)
        weights, taken = explicit_weights(explicit, use_ema=not args.no_ema)
        deq, config = build_deq(args.config_yml, overrides, args.seed)
        depth = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("backbone.blocks."))
        blocks = [int(b) % depth for b in args.blocks.split(",")]
        state, rows = deq_state_from_explicit(deq.state_dict(), weights, blocks)
    except (CheckpointError, MappingError, FileNotFoundError) as error:
        parser.exit(2, f"deq_from_explicit: error: {error}\n")
    print(f"{args.explicit}: {taken} of a {depth}-block explicit model; f <- explicit block(s) {blocks}")
    print("\n".join(summarise_mapping(rows)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "config": config, "normalizers": explicit.get("normalizers", {}),
                "elementrefs": explicit.get("elementrefs", {}),
                "source": {"explicit": str(args.explicit), "blocks": blocks, "weights": taken}}, out)
    kept = sum(source is None for _, source in rows)
    print(f"wrote {out}: {len(rows) - kept} tensors from the explicit model, {kept} kept from initialisation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
