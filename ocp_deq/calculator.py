"""ASE calculator for ocp_deq checkpoints that reuses the fixed point across calls.

Successive calls of an optimiser or MD integrator see almost the same structure, so the
previous fixed point is an excellent start: the warm-start solver (``model.deq.reuse``)
often stops after one or two evaluations of f instead of a cold solve.
"""

from __future__ import annotations

import ocp_deq  # noqa: F401  (registrations before fairchem builds the trainer)
from fairchem.core.common.relaxation.ase_utils import OCPCalculator

from ocp_deq.deq.reuse import FixedPointCache
from ocp_deq.trainers.checkpointing import load_checkpoint_file


class DEQCalculator(OCPCalculator):
    """fairchem's ``OCPCalculator`` (same arguments: ``checkpoint_path``, ``config_yml``,
    ``cpu``, ``seed``, ...) plus fixed-point reuse.

    ``reuse``: warm-start every call from the previous fixed point of the same Atoms
    (``system_id`` names it in the cache). A change of atom count or elements resets it.
    After each call, ``last_nstep`` / ``last_residual`` / ``last_converged`` / ``last_warm``
    describe the solve (function evaluations, relative residual, convergence, warm start),
    ``last_refined`` whether a loose warm solve was solved again because its forces came out
    below ``refine_fmax`` (eV/A; pass the optimiser's fmax; default: the checkpoint's
    ``model.deq.reuse.refine_fmax``, off when null; it only acts with a looser ``reuse.solver``);
    with conservative forces ``last_backward_converged`` tells whether the IFT backward solve
    behind the forces converged (None otherwise).
    """

    def __init__(self, *args, reuse: bool = True, system_id: str = "atoms", refine_fmax: float | None = None, **kwargs):
        kwargs.setdefault("trainer", "deq")  # fairchem stores its task name ("ocp") as the trainer
        checkpoint_path = kwargs.get("checkpoint_path", args[1] if len(args) > 1 else None)
        if checkpoint_path is not None:
            # fairchem reads the config with a bare torch.load (unrestricted before torch 2.6):
            # refuse a file that needs more than tensors and plain containers first
            load_checkpoint_file(checkpoint_path)
        super().__init__(*args, **kwargs)
        self.model = self.trainer._unwrapped_model
        if not hasattr(self.model, "reusing"):
            raise TypeError(f"DEQCalculator needs a deq_equiformer_v2 checkpoint, got {type(self.model).__name__}")
        if refine_fmax is not None:
            settings = self.model.backbone.deq_settings.reuse
            settings.refine_fmax = refine_fmax
            settings.validate("DEQCalculator")
        self.cache = FixedPointCache(self.model.backbone.deq_settings.reuse) if reuse else None
        self.system_id = system_id
        self._identity = None
        self.last_nstep = self.last_residual = self.last_converged = self.last_warm = self.last_refined = None
        self.last_backward_converged = None

    def _record_solve(self) -> None:
        """The solver statistics of the model output the trainer kept from the last call."""
        output = self.trainer.last_model_output
        self.last_nstep = output["deq_nstep"].tolist()
        self.last_residual = output["deq_residual"].tolist()
        self.last_converged = output["deq_converged"].tolist()
        backward = output.get("deq_backward_converged")
        self.last_backward_converged = backward.tolist() if backward is not None else None
        last = self.cache.last if self.cache is not None and self.cache.last else {}
        unset = [False] * len(self.last_nstep)
        self.last_warm = last["warm"].tolist() if "warm" in last else unset
        self.last_refined = last["deq_refined"].tolist() if "deq_refined" in last else unset

    def reset_fixed_point(self) -> None:
        """Forget the stored fixed points: the next call starts cold."""
        if self.cache is not None:
            self.cache.clear()
            self.cache.last = None

    def calculate(self, atoms=None, properties=None, system_changes=None) -> None:
        identity = (len(atoms), tuple(atoms.get_atomic_numbers())) if hasattr(atoms, "get_atomic_numbers") else None
        if identity != self._identity:
            self.reset_fixed_point()
            self._identity = identity
        if self.cache is None:
            super().calculate(atoms, properties, system_changes)
        else:
            with self.model.reusing(self.cache) as cache:
                if cache is None or identity is None:  # reuse disabled in the model, or a Batch (its sids name the systems)
                    super().calculate(atoms, properties, system_changes)
                else:
                    with cache.keys([self.system_id]):
                        super().calculate(atoms, properties, system_changes)
        self._record_solve()
