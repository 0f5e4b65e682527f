"""The ``model.deq`` block of an OCP yml, validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

SOLVERS = ("anderson", "broyden", "fixed_point_iter")
STOP_MODES = ("rel", "abs")
INJECTIONS = ("add_rescale", "add")


class DEQConfigError(ValueError):
    """A bad ``model.deq`` option; the message names the key."""


def _build(cls, values: dict | None, where: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DEQConfigError(
            f"unknown DEQ option(s) {unknown} in '{where}'; known options: {sorted(known)}"
        )
    obj = cls(**values)
    obj.validate(where)
    return obj


@dataclass
class SolverSettings:
    """One forward fixed-point solve: which torchdeq solver, when to stop."""

    solver: str = "anderson"
    tol: float = 1e-2
    stop_mode: str = "rel"
    max_iter: int = 40
    anderson_m: int = 5

    def validate(self, where: str) -> None:
        if self.solver not in SOLVERS:
            raise DEQConfigError(f"{where}.solver='{self.solver}' must be one of {SOLVERS}")
        if self.stop_mode not in STOP_MODES:
            raise DEQConfigError(f"{where}.stop_mode='{self.stop_mode}' must be one of {STOP_MODES}")
        if not self.tol > 0:
            raise DEQConfigError(f"{where}.tol must be > 0, got {self.tol}")
        if int(self.max_iter) < 1:
            raise DEQConfigError(f"{where}.max_iter must be >= 1, got {self.max_iter}")


@dataclass
class DEQSettings:
    """Everything DEQ-specific; lives under ``model: {deq: {...}}`` in the yml."""

    injection: str = "add_rescale"
    post_norm: bool = True
    grad_steps: int = 1
    grad_tau: float = 1.0
    train_solver: SolverSettings = field(default_factory=SolverSettings)
    eval_solver: SolverSettings = field(default_factory=SolverSettings)

    @classmethod
    def from_config(cls, values: dict | None, where: str = "model.deq") -> "DEQSettings":
        values = dict(values or {})
        for key in ("train_solver", "eval_solver"):
            if key in values:
                if not isinstance(values[key], dict):
                    raise DEQConfigError(f"{where}.{key} must be a mapping of solver options")
                values[key] = _build(SolverSettings, values[key], f"{where}.{key}")
        return _build(cls, values, where)

    def validate(self, where: str) -> None:
        if self.injection not in INJECTIONS:
            raise DEQConfigError(f"{where}.injection='{self.injection}' must be one of {INJECTIONS}")
        if int(self.grad_steps) < 1:
            raise DEQConfigError(f"{where}.grad_steps must be >= 1, got {self.grad_steps}")
