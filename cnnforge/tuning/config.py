"""``SearchConfig``: everything that defines a search, built and checked in one place.

``from_options`` takes what the command line parsed; ``from_json`` reads a run directory's
``config.json`` (keys from other versions of cnnforge are ignored); ``validate`` checks every
field with a one-line error; ``identity`` is what a run directory may be resumed with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cnnforge.core.contract import TRAINING_PRECISIONS, TUNERS
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import Preprocessing, parse_size
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, load_dataset
from cnnforge.tracking import parse_track
from cnnforge.tuning.candidate import LIMITS, Budget, Target
from cnnforge.tuning.plan import COUNT_DEFAULTS, DEFAULT_BUDGET_S

# Settings that define a search; a run directory is resumed only with the same ones. The
# latency target is one: CPU and GPU latencies on one Pareto front would mean nothing.
IDENTITY_KEYS = (
    "data",
    "arch",
    "backbone",
    "weights",
    "tuner",
    "objective",
    "seed",
    "fix",
    "space",
    "val_fraction",
    "search_fraction",
    "epochs",
    "batch_size",
    "latency_provider",
    "latency_batch_size",
    "image_size",
    "resize",
    "interpolation",
    "class_weight",
    "precision",
    "patience",
    "deterministic",
    *LIMITS.values(),  # a budget decides which trials train
)
# What the command line passes through unchanged (beside data, model, fix and space).
OPTION_FIELDS = (
    "run_dir",
    "tuner",
    "max_trials",
    "epochs",
    "batch_size",
    "objective",
    "seed",
    "patience",
    "strategy",
    "time_budget",
    "retrain",
    "search_fraction",
    "deterministic",
    "precision",
    "latency_provider",
    "latency_batch_size",
    "image_size",
    "resize",
    "interpolation",
    "strict_data",
    "class_weight",
    *LIMITS.values(),
)
# A distributed search's options that are fields as they are (the addresses are not).
DISTRIBUTED_FIELDS = ("distributed", "worker_id", "worker_timeout")


@dataclass
class SearchConfig:
    """Everything that defines a search. ``fix`` pins hyperparameters; ``space`` narrows them.

    The model is an architecture (``arch``, simple_cnn unless a backbone is given) or a backbone
    (``backbone``: a registered one or ``run:PATH``) with ``weights``: imagenet (the default),
    none, or a weights file.
    """

    data: str = "fashion_mnist_small"
    arch: str | None = None
    backbone: str | None = None
    weights: str | None = None
    run_dir: Path = Path("runs/latest")
    # "auto" (the default): a planned successive halving over the plugin's priors
    # (``cnnforge.tuning.plan``); or one of KerasTuner's oracles. Counts and batch size left
    # None are chosen: by the plan, or KerasTuner's 10 trials of 10 epochs; the batch size from
    # the number of training images.
    tuner: str = "auto"
    max_trials: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    objective: str = "val_accuracy"
    seed: int = 0
    patience: int = 3
    val_fraction: float = 0.1
    fix: dict[str, str] = field(default_factory=dict)
    space: dict[str, list[str]] = field(default_factory=dict)
    # Distributed search: "chief" (serves the oracle at ``address``) or "worker" (runs trials
    # for the chief at ``address``, as ``worker_id``); a silent worker loses its trial after
    # ``worker_timeout`` seconds.
    distributed: str | None = None
    address: str | None = None
    worker_id: str | None = None
    worker_timeout: float = 300.0
    # "mirrored": each trial trains on all local GPUs with tf.distribute.MirroredStrategy.
    strategy: str | None = None
    # Each candidate is timed with onnxruntime on this provider at this batch size before it is
    # trained; one over a budget below (None: no limit) is recorded but not trained.
    latency_provider: str = "cpu"
    latency_batch_size: int = 1
    max_latency_ms: float | None = None
    max_params: int | None = None
    max_flops: int | None = None
    max_size_mb: float | None = None
    # Seconds the search may take, final training included (None: no limit): no trial starts,
    # and a running one stops, once the time left is what the final training needs.
    time_budget: float | None = None
    # Train the best trial's model again on train+validation, for the epochs it took to its best
    # (fewer if the time budget has no room for them); off: keep the trial's own model.
    retrain: bool = True
    # The share of the training examples (stratified) each trial trains on.
    search_fraction: float = 1.0
    # Same seed, same numbers: TensorFlow's deterministic ops (slower for some ops).
    deterministic: bool = False
    # "auto" trains in mixed float16 on a GPU and float32 on a CPU; or "float32" or "mixed".
    precision: str = "auto"
    # Trackers (tensorboard, mlflow; [] for none); None: those the run directory recorded, or
    # TensorBoard for a new one. Not part of the identity: a resume may add or drop one.
    track: list[str] | None = None
    # How images become the model's input (image folders; ``cnnforge.core.preprocessing``):
    # size "N" or "HxW" (None: chosen from the data), resize policy, interpolation; an
    # unreadable image is skipped, or with ``strict_data`` an error. ``class_weight`` "auto":
    # each class weighted inversely to its share of the training images.
    image_size: str | None = None
    resize: str = "stretch"
    interpolation: str = "bilinear"
    strict_data: bool = False
    class_weight: str | None = None

    def __post_init__(self) -> None:
        if self.arch is None and self.backbone is None:
            self.arch = "simple_cnn"
        self.run_dir = Path(self.run_dir)
        # Pins and choices are kept as the text the command line would give (True -> "True"),
        # so config.json compares equal on resume whichever way they were written.
        self.fix = {name: _as_text(value) for name, value in self.fix.items()}
        self.space = {name: _as_texts(values) for name, values in self.space.items()}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SearchConfig:
        """A configuration from parsed command-line options: ``fix`` as ``{name: value}``,
        ``space`` as ``{name: "v1,v2"}``; options that are not fields are ignored.

        A distributed search takes ``distributed`` (chief or worker), ``listen`` (a chief's
        address), ``chief`` (a worker's chief), ``worker_id`` and ``worker_timeout``; the
        role's own address becomes ``address``. Option combinations that make no sense raise a
        ``CnnforgeError`` naming the flags; the values are checked later, by ``validate``."""
        if options.get("arch") and options.get("backbone"):
            raise CnnforgeError("--arch and --backbone are mutually exclusive; give one")
        if options.get("weights") and not options.get("backbone"):
            raise CnnforgeError("--weights needs --backbone")
        given = {
            name: options[name]
            for name in (*OPTION_FIELDS, *DISTRIBUTED_FIELDS)
            if options.get(name) is not None
        }
        role = options.get("distributed")
        address = {"chief": options.get("listen"), "worker": options.get("chief")}.get(role or "")
        return cls(
            data=options.get("data") or cls.data,
            arch=options.get("arch"),
            backbone=options.get("backbone"),
            weights=options.get("weights"),
            fix=dict(options.get("fix") or {}),
            space=dict(options.get("space") or {}),
            address=address,
            track=list(options["track"]) if options.get("track") else None,
            **given,
        )

    @classmethod
    def from_json(cls, saved: dict[str, Any], **overrides: Any) -> SearchConfig:
        """The configuration a run's ``config.json`` recorded (its ``search`` entry); keys that
        this version of cnnforge does not know are ignored, missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**saved, **overrides}.items() if k in known})

    def identity(self) -> dict[str, Any]:
        """What a run directory may be resumed with: these must match its config.json."""
        saved = self.to_json()
        return {key: saved.get(key) for key in IDENTITY_KEYS}

    @property
    def trial_count(self) -> int:
        """The most trials (KerasTuner's oracles; the auto plan counts its own)."""
        return self.max_trials or COUNT_DEFAULTS["max_trials"]

    @property
    def trial_epochs(self) -> int:
        """Epochs per trial (Hyperband: the most; the auto plan sets each trial's)."""
        return self.epochs or COUNT_DEFAULTS["epochs"]

    def effective_time_budget(self) -> float | None:
        """Seconds the search may take: the budget given, or, for an auto search given neither
        a budget nor counts (``--max-trials``, ``--epochs``), the default one."""
        if self.time_budget is not None:
            return self.time_budget
        counted = self.max_trials is not None or self.epochs is not None
        return DEFAULT_BUDGET_S if self.tuner == "auto" and not counted else None

    @property
    def model_name(self) -> str:
        """The architecture or backbone searched."""
        return self.backbone or self.arch or "simple_cnn"

    def validate(self) -> None:
        if self.arch and self.backbone:
            raise CnnforgeError(
                f"give an architecture ({self.arch}) or a backbone ({self.backbone}), not both"
            )
        if self.weights is not None and not self.backbone:
            raise CnnforgeError("weights apply to a backbone; give one or drop the weights")
        if self.tuner not in TUNERS:
            raise CnnforgeError(f"unknown tuner {self.tuner!r}; choose one of {', '.join(TUNERS)}")
        for name in ("max_trials", "epochs", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CnnforgeError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.patience < 0:
            raise CnnforgeError(f"patience must be 0 (off) or more, got {self.patience}")
        if self.distributed:
            _validate_distributed(self)
        if self.strategy not in (None, "mirrored"):
            raise CnnforgeError(f"--strategy takes mirrored, got {self.strategy!r}")
        if not 0 < self.search_fraction <= 1:
            raise CnnforgeError(f"search-fraction must be in (0, 1], got {self.search_fraction}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise CnnforgeError(f"time budget must be positive, got {self.time_budget} s")
        self.preprocessing()  # size, policy and interpolation, each checked
        if self.class_weight not in (None, "auto"):
            raise CnnforgeError(f"--class-weight takes auto, got {self.class_weight!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise CnnforgeError(
                f"precision takes {', '.join(TRAINING_PRECISIONS)}, got {self.precision!r}"
            )
        self._validate_budget()
        if self.track is not None:
            parse_track(self.track)

    def _validate_budget(self) -> None:
        from cnnforge.deploy.runtime import provider_name

        provider_name(self.latency_provider)  # named, and installed in this onnxruntime
        if self.latency_batch_size < 1:
            raise CnnforgeError(
                f"latency-batch-size must be at least 1, got {self.latency_batch_size}"
            )
        for name in LIMITS.values():
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CnnforgeError(f"{name.replace('_', '-')} must be positive, got {value}")

    def budget(self) -> Budget:
        return Budget(**{name: getattr(self, name) for name in LIMITS.values()})

    def target(self) -> Target:
        return Target(self.latency_provider, self.latency_batch_size)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "run_dir": str(self.run_dir)}

    def load_data(self) -> Dataset:
        """The data this configuration names, loaded and split as its search splits it."""
        return load_dataset(
            self.data,
            val_fraction=self.val_fraction,
            seed=self.seed,
            preprocessing=self.data_preprocessing(),
            strict=self.strict_data,
        )

    def data_preprocessing(self) -> Preprocessing:
        """The preprocessing to read the data with: the one the run directory recorded in
        data.json when it is what was asked for, so a resumed search, a worker sharing the run
        directory or ``trial_model`` gets the input shape of the checkpoints even if the folder
        changed (a size chosen from the data is not chosen again); else the one asked for."""
        asked = self.preprocessing()
        run = RunDir(self.run_dir)
        saved = (run.read_json(run.data) or {}).get("preprocessing") if run.is_run() else None
        if not saved:
            return asked
        recorded = Preprocessing.from_json(saved)
        same = asked.size in (None, recorded.size) and (asked.policy, asked.interpolation) == (
            recorded.policy,
            recorded.interpolation,
        )
        return recorded if same else asked  # another search: the run directory check refuses it

    def preprocessing(self) -> Preprocessing:
        """The preprocessing asked for (what it leaves open is chosen from the data)."""
        return Preprocessing(
            size=parse_size(self.image_size), policy=self.resize, interpolation=self.interpolation
        )


def _validate_distributed(config: SearchConfig) -> None:
    if config.distributed not in ("chief", "worker"):
        raise CnnforgeError(f"--distributed takes chief or worker, got {config.distributed!r}")
    flag = "--listen" if config.distributed == "chief" else "--chief"
    host, _, port = (config.address or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CnnforgeError(
            f"a {config.distributed} needs {flag} HOST:PORT, got {config.address!r}"
        )
    if config.distributed == "worker" and (not config.worker_id or "chief" in config.worker_id):
        raise CnnforgeError("a worker needs --worker-id ID, unique per worker and without 'chief'")
    if config.worker_timeout <= 0:
        raise CnnforgeError(f"worker timeout must be positive seconds, got {config.worker_timeout}")


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _as_texts(values: Any) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` or ``[1, 2]`` as ``["a", "b"]`` / ``["1", "2"]``."""
    if isinstance(values, str):
        values = values.split(",")
    return [text for text in (_as_text(v).strip() for v in values) if text]
