"""The ``model.deq`` block of an OCP yml, validated with clear errors."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

SOLVERS = ("anderson", "broyden", "fixed_point_iter")
GRADIENTS = ("phantom", "ift", "bptt")
NONFINITE_ACTIONS = ("stop", "skip")
STOP_MODES = ("rel", "abs")
INJECTIONS = ("add_rescale", "add")
FORMS = ("block", "update")


class DEQConfigError(ValueError):
    """A bad ``model.deq`` option; the message names the key."""


def _as_bool(value, where: str) -> bool:
    """yml booleans, and the strings fairchem's command-line overrides leave for true/false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DEQConfigError(f"{where} must be true or false, got {value!r}")


def _as_number(value, kind: str, where: str):
    """Numbers, and the strings YAML 1.1 leaves for exponents without a dot (``1e-3``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DEQConfigError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise DEQConfigError(f"{where} must be a number, got {value!r}") from None
    if kind == "float":
        return number
    if not number.is_integer():
        raise DEQConfigError(f"{where} must be a whole number, got {value!r}")
    return int(number)


def _build(cls, values: dict | None, where: str):
    values = dict(values or {})
    for key, section in getattr(cls, "_SECTIONS", {}).items():
        if key in values:
            if values[key] is None and cls.__dataclass_fields__[key].default is None:
                continue
            if not isinstance(values[key], dict):
                raise DEQConfigError(f"{where}.{key} must be a mapping of options")
            spec = cls.__dataclass_fields__[key]
            base = spec.default_factory() if spec.default_factory is not MISSING else None
            default = asdict(base if base is not None else section())
            values[key] = _build(section, {**default, **values[key]}, f"{where}.{key}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DEQConfigError(
            f"unknown DEQ option(s) {unknown} in '{where}'; known options: {sorted(known)}"
        )
    for f in fields(cls):
        if f.name not in values:
            continue
        if f.type == "bool":
            values[f.name] = _as_bool(values[f.name], f"{where}.{f.name}")
        elif f.type in ("int", "float"):
            values[f.name] = _as_number(values[f.name], f.type, f"{where}.{f.name}")
    obj = cls(**values)
    obj.validate(where)
    return obj


@dataclass
class SolverSettings:
    """One fixed-point solve: which solver (``ocp_deq.deq.solvers``), when to stop; ``max_iter``
    counts evaluations of f."""

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
class CorrectionSettings:
    """Fixed-point correction: extra losses on ``n_states - 1`` earlier solver states."""

    n_states: int = 1
    decay: float = 0.8

    def validate(self, where: str) -> None:
        if int(self.n_states) < 1:
            raise DEQConfigError(f"{where}.n_states must be >= 1, got {self.n_states}")
        if not 0 < self.decay <= 1:
            raise DEQConfigError(f"{where}.decay must be in (0, 1], got {self.decay}")


JACOBIAN_KINDS = ("frobenius", "spectral")


@dataclass
class JacobianSettings:
    """Jacobian regularisation at z*, weight * penalty every 1/freq training steps.

    ``kind: frobenius``: ||df/dz||_F^2 / dim (Hutchinson, ``vectors`` probes), the mean
    squared singular value. ``kind: spectral``: relu(rho - target)^2 per graph, rho the
    contraction estimated by ``power_iters`` power-iteration steps (the last one
    differentiated): it pushes on the slowest mode, which sets the solver's evaluations,
    and only where rho exceeds ``target``; with ``freq: 1`` the training solves' rho is then
    logged as ``deq_contraction``.
    """

    weight: float = 0.0
    freq: float = 1.0
    vectors: int = 1
    kind: str = "frobenius"
    target: float = 0.5
    power_iters: int = 4

    def validate(self, where: str) -> None:
        if self.weight < 0 or not 0 <= self.freq <= 1 or int(self.vectors) < 1:
            raise DEQConfigError(f"{where}: need weight >= 0, 0 <= freq <= 1, vectors >= 1")
        if self.kind not in JACOBIAN_KINDS:
            raise DEQConfigError(f"{where}.kind='{self.kind}' must be one of {JACOBIAN_KINDS}")
        if not 0 < self.target < 1 or int(self.power_iters) < 1:
            raise DEQConfigError(f"{where}: need 0 < target < 1 and power_iters >= 1, "
                                 f"got target={self.target}, power_iters={self.power_iters}")


START_STRATEGIES = ("plain", "extrapolate")


@dataclass
class ReuseSettings:
    """Warm starts from a system's previous fixed point (relaxations, MD, ordered evaluation).

    ``solver`` serves warm-started graphs (default null: ``eval_solver``, as for cold ones;
    the residual is checked after every evaluation, so a converged start costs one).
    Graphs it leaves unconverged are finished by ``eval_solver`` from where it stopped when
    ``fallback`` is on. ``start``: the last fixed point (``plain``) or the linear
    extrapolation of the last two (``extrapolate``).

    ``refine_fmax`` (eV/A) serves a looser ``solver``: a warm graph whose forces (max norm
    over its free atoms) come out below it is solved again from that fixed point with
    ``eval_solver``. Set to the optimiser's fmax, only the steps where it could stop are
    refined, so it stops on forces as accurate as a cold solve's while the loose solves serve
    the rest of the path (docs/benchmarks/reuse_banded); set higher, BFGS sees forces of two
    precisions in turn and wanders (docs/benchmarks/reuse_refined). null (default): the
    relaxation's fmax in ``--mode run-relaxations`` (``task.relaxation_fmax``), off
    elsewhere (``DEQCalculator(refine_fmax=...)`` for ASE); 0: off.
    """

    enabled: bool = True
    max_systems: int = 10000
    start: str = "plain"
    fallback: bool = True
    solver: SolverSettings | None = None
    refine_fmax: float | None = None

    _SECTIONS = {"solver": SolverSettings}

    def validate(self, where: str) -> None:
        if self.start not in START_STRATEGIES:
            raise DEQConfigError(f"{where}.start='{self.start}' must be one of {START_STRATEGIES}")
        if int(self.max_systems) < 1:
            raise DEQConfigError(f"{where}.max_systems must be >= 1, got {self.max_systems}")
        if self.refine_fmax is not None and (isinstance(self.refine_fmax, bool) or not isinstance(self.refine_fmax, (int, float))
                                             or self.refine_fmax < 0):
            raise DEQConfigError(f"{where}.refine_fmax must be null or a number >= 0 (0 turns it off), "
                                 f"got {self.refine_fmax!r}")


DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class TrainStartSettings:
    """Warm-started training solves from each frame's last fixed point (across epochs) or
    the nearest stored frame of its trajectory; bounded by ``memory_mb`` (CPU)."""

    enabled: bool = False
    memory_mb: float = 2048.0
    same_trajectory: bool = True
    dtype: str = "float16"

    def validate(self, where: str) -> None:
        if not self.memory_mb > 0:
            raise DEQConfigError(f"{where}.memory_mb must be > 0, got {self.memory_mb}")
        if self.dtype not in DTYPES:
            raise DEQConfigError(f"{where}.dtype='{self.dtype}' must be one of {DTYPES}")


@dataclass
class DEQSettings:
    """Everything DEQ-specific; lives under ``model: {deq: {...}}`` in the yml."""

    injection: str = "add"
    form: str = "update"
    update_gain: float = 1.0
    pre_norm: bool = False
    post_norm: bool = False
    gradient: str = "phantom"
    grad_steps: int = 1
    grad_tau: float = 1.0
    weight_norm: bool = False
    spectral_norm: bool = False
    variational_dropout: float = 0.0
    on_nonfinite: str = "stop"
    train_solver: SolverSettings = field(default_factory=SolverSettings)
    eval_solver: SolverSettings = field(default_factory=SolverSettings)
    backward_solver: SolverSettings = field(
        default_factory=lambda: SolverSettings(solver="anderson", tol=1e-4, max_iter=40)
    )
    jacobian: JacobianSettings = field(default_factory=JacobianSettings)
    correction: CorrectionSettings = field(default_factory=CorrectionSettings)
    reuse: ReuseSettings = field(default_factory=ReuseSettings)
    train_start: TrainStartSettings = field(default_factory=TrainStartSettings)
    contraction_iters: int = 6

    _SECTIONS = {
        "train_solver": SolverSettings,
        "eval_solver": SolverSettings,
        "backward_solver": SolverSettings,
        "jacobian": JacobianSettings,
        "correction": CorrectionSettings,
        "reuse": ReuseSettings,
        "train_start": TrainStartSettings,
    }

    @classmethod
    def from_config(cls, values: dict | None, where: str = "model.deq") -> "DEQSettings":
        return _build(cls, values, where)

    def validate(self, where: str) -> None:
        if self.injection not in INJECTIONS:
            raise DEQConfigError(f"{where}.injection='{self.injection}' must be one of {INJECTIONS}")
        if self.form not in FORMS:
            raise DEQConfigError(f"{where}.form='{self.form}' must be one of {FORMS}")
        if not self.update_gain > 0:
            raise DEQConfigError(f"{where}.update_gain must be > 0, got {self.update_gain}")
        if self.gradient not in GRADIENTS:
            raise DEQConfigError(f"{where}.gradient='{self.gradient}' must be one of {GRADIENTS}")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise DEQConfigError(f"{where}.on_nonfinite='{self.on_nonfinite}' must be one of {NONFINITE_ACTIONS}")
        if int(self.grad_steps) < 1:
            raise DEQConfigError(f"{where}.grad_steps must be >= 1, got {self.grad_steps}")
        if self.weight_norm and self.spectral_norm:
            raise DEQConfigError(f"{where}: choose one of weight_norm and spectral_norm")
        if int(self.contraction_iters) < 0:
            raise DEQConfigError(f"{where}.contraction_iters must be >= 0, got {self.contraction_iters}")
        if not 0 <= self.variational_dropout < 1:
            raise DEQConfigError(f"{where}.variational_dropout must be in [0, 1)")
