"""Plain-data configuration of a model (ModelConfig) and of a training run (TrainConfig)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vaeserve.manifest import DECODER_OUTPUTS, LIKELIHOODS

__all__ = [
    "ARCHS",
    "LR_SCHEDULES",
    "PRIORS",
    "PSEUDO_INITS",
    "BINARIZE_MODES",
    "CONDITIONINGS",
    "DEFAULT_HIDDEN_DIMS",
    "DEVICES",
    "KINDS",
    "LIKELIHOODS",
    "ModelConfig",
    "TrainConfig",
]

KINDS = ("vae", "cvae")
CONDITIONINGS = ("concat", "prior")
ARCHS = ("mlp", "conv")
BINARIZE_MODES = ("none", "static", "dynamic")
DEVICES = ("auto", "cpu", "cuda")
# "normal": N(0, I) (a prior CVAE: N(mu_y, I)); "vamp": the VampPrior (Tomczak & Welling 2018),
# the mean of the encoder's posteriors at prior_components learned pseudo-inputs.
PRIORS = ("normal", "vamp")
PSEUDO_INITS = ("random", "data")
# "constant": Adam's lr throughout; "cosine": lr · ½(1 + cos(π · step / steps of --epochs)).
LR_SCHEDULES = ("constant", "cosine")

# For "mlp" these are layer widths; for "conv" they are channel counts of stride-2 convolutions.
# The MLP widths were chosen by the experiments recorded in docs/training.md.
DEFAULT_HIDDEN_DIMS = {"mlp": (512, 256), "conv": (32, 64)}


# What a run stored before these TrainConfig fields existed did: a resumed or compared old
# run must keep meaning what it meant, not take today's defaults.
_BEFORE_FIELDS = {
    "prior": "normal",
    "prior_components": 500,
    "pseudo_init": "random",
    "prior_mean_scale": 0.0,
    "val_fraction": 0.1,
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "ema_decay": 0.0,
}


def _fail(field_name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{field_name}: expected {expected}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)


def _check_float(name: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _fail(name, "a positive finite number" if positive else "a finite number", value)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise _fail(name, "a non-empty sequence of positive integers", value)
    for item in value:
        _check_int(name, item, 1)
    return tuple(value)


def _from_dict(cls: type, d: Any, tuple_fields: tuple[str, ...]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    values = dict(d)
    for name in tuple_fields:
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a VAE/CVAE; stored in the checkpoint as plain values.

    Construction validates every field and raises ValueError naming the field.
    """

    kind: str = "vae"  # "vae" | "cvae"
    conditioning: str | None = None  # "concat" | "prior" for a CVAE, None for a VAE
    arch: str = "mlp"  # "mlp" | "conv"
    likelihood: str = "bernoulli"  # "bernoulli" | "gaussian" | "gaussian-learned"
    data_shape: tuple[int, ...] = (1, 8, 8)  # (C, H, W) of one image
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = DEFAULT_HIDDEN_DIMS["mlp"]
    num_classes: int | None = None  # number of labels of a CVAE, None for a VAE
    gaussian_sigma: float = 0.1  # fixed decoder σ of the "gaussian" likelihood (pixel units)
    logvar_min: float = -10.0  # clamp of the encoder's log σ² (keeps exp() finite)
    logvar_max: float = 10.0
    # Clamp of the decoder's log σ for "gaussian-learned": constant pixels (the blank border
    # of a digit) would otherwise drive σ to 0 and the density to infinity.
    log_sigma_min: float = -4.6  # σ >= 0.01
    log_sigma_max: float = 2.0
    prior: str = "normal"  # one of PRIORS
    prior_components: int | None = None  # pseudo-inputs of a "vamp" prior, None otherwise
    # Initial distance of a prior CVAE's class means from 0 (each on an axis of its own); 0
    # starts them all at 0. Only the starting point: the means are learned.
    prior_mean_scale: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("prior", self.prior, PRIORS)
        if self.prior == "vamp":
            # A CVAE's prior is conditional (class means, or N(0, I) beside a one-hot y); a
            # label-free mixture would ignore the label it is asked to sample.
            if self.kind != "vae":
                raise _fail("prior", "'normal' for kind 'cvae' ('vamp' is for a vae)", self.prior)
            _check_int("prior_components", self.prior_components, 1)
        elif self.prior_components is not None:
            raise _fail("prior_components", "None unless prior is 'vamp'", self.prior_components)
        _check_float("prior_mean_scale", self.prior_mean_scale)
        if self.prior_mean_scale < 0:
            raise _fail("prior_mean_scale", "a number >= 0", self.prior_mean_scale)
        if self.kind == "vae":
            if self.conditioning is not None:
                raise _fail("conditioning", "None for kind 'vae'", self.conditioning)
            if self.num_classes is not None:
                raise _fail("num_classes", "None for kind 'vae'", self.num_classes)
        else:
            _check_choice("conditioning", self.conditioning, CONDITIONINGS)
            _check_int("num_classes", self.num_classes, 1)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        shape = _int_tuple("data_shape", self.data_shape)
        if len(shape) != 3:
            raise _fail("data_shape", "(C, H, W)", self.data_shape)
        object.__setattr__(self, "data_shape", shape)
        _check_int("latent_dim", self.latent_dim, 1)
        object.__setattr__(self, "hidden_dims", _int_tuple("hidden_dims", self.hidden_dims))
        _check_float("gaussian_sigma", self.gaussian_sigma, positive=True)
        for name in ("logvar_min", "logvar_max", "log_sigma_min", "log_sigma_max"):
            _check_float(name, getattr(self, name))
        if self.logvar_min >= self.logvar_max:
            raise _fail("logvar_max", f"> logvar_min ({self.logvar_min})", self.logvar_max)
        if self.log_sigma_min >= self.log_sigma_max:
            raise _fail(
                "log_sigma_max", f"> log_sigma_min ({self.log_sigma_min})", self.log_sigma_max
            )

    @property
    def decoder_output_names(self) -> tuple[str, ...]:
        """Names of the tensors `VAE.decode` returns, in order (also the ONNX output names)."""
        return DECODER_OUTPUTS[self.likelihood]

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["data_shape"] = list(self.data_shape)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from `to_dict()` output.

        A stored "dropout" (the removed option) is dropped: dropout holds no weights and is
        off outside training, so the model is the same (training/checkpoint.py renames the
        layers of an MLP that had it).

        Raises:
            ValueError: a field is unknown or has a bad value; the message names it.
        """
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k != "dropout"}
        return _from_dict(cls, d, ("data_shape", "hidden_dims"))


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model choices and optimisation settings (the CLI's defaults)."""

    dataset: str = "digits"  # digits | mnist:DIR | fashion-mnist:DIR | npz:PATH
    model: str = "vae"  # "vae" | "cvae"
    conditioning: str | None = None  # CVAE only; None means "concat"
    likelihood: str = "bernoulli"
    # None: "static" for a Bernoulli likelihood, else "none". Static, because 42% of the 8×8
    # digits' pixels are grey: a fresh Bernoulli draw of them is mostly noise (docs/training.md).
    binarize: str | None = None
    arch: str = "mlp"
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] | None = None  # None: DEFAULT_HIDDEN_DIMS[arch]
    gaussian_sigma: float = 0.1
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) when > 0; Adam otherwise
    # > 0: validate and keep the exponential moving average of the weights (decay per step):
    # 0.99 averages ~100 steps; -0.17 nats over the plain weights on pythae's split, 3 seeds
    # (docs/training.md). 0 keeps the weights themselves.
    ema_decay: float = 0.99
    beta: float = 1.0  # weight of the KL term (β-VAE); 1 gives the ELBO
    kl_warmup_epochs: int = 50  # β rises linearly from 0 over this many epochs
    train_k: int = 5  # importance samples of the training objective; 1 trains the ELBO
    # One of PRIORS; None: "vamp" for a VAE (-0.19 nats, docs/training.md), "normal" for a
    # CVAE (its prior is conditional; "vamp" is refused there).
    prior: str | None = None
    prior_components: int = 50  # pseudo-inputs of the "vamp" prior
    # A VampPrior's pseudo-inputs start at random training images ("data"), or near grey.
    pseudo_init: str = "data"
    # A prior CVAE's class means start this far from 0, each on its own axis: from 0 they end
    # too close for unit-variance draws (docs/training.md).
    prior_mean_scale: float = 6.5
    eval_k: int = 1000  # importance samples of the final test NLL
    # Share of the training images held out as val, whose best epoch is the checkpoint kept.
    # 0 trains on every training image and keeps the last epoch (choose --epochs on runs
    # that held val out: docs/training.md).
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    save_interval_s: float = 10.0  # a resumable checkpoint at most this often, and at the end

    def __post_init__(self) -> None:
        _check_choice("model", self.model, KINDS)
        if self.model == "vae" and self.conditioning is not None:
            raise _fail("conditioning", "None for model 'vae'", self.conditioning)
        if self.model == "cvae":
            object.__setattr__(self, "conditioning", self.conditioning or "concat")
            _check_choice("conditioning", self.conditioning, CONDITIONINGS)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        if self.binarize is None:
            default = "static" if self.likelihood == "bernoulli" else "none"
            object.__setattr__(self, "binarize", default)
        _check_choice("binarize", self.binarize, BINARIZE_MODES)
        _check_choice("arch", self.arch, ARCHS)
        if self.prior is None:
            object.__setattr__(self, "prior", "vamp" if self.model == "vae" else "normal")
        _check_choice("prior", self.prior, PRIORS)
        if self.prior == "vamp" and self.model != "vae":
            raise _fail("prior", "'normal' for model 'cvae' ('vamp' is for a vae)", self.prior)
        _check_int("prior_components", self.prior_components, 1)
        _check_float("prior_mean_scale", self.prior_mean_scale)
        if self.prior_mean_scale < 0:
            raise _fail("prior_mean_scale", "a number >= 0", self.prior_mean_scale)
        _check_choice("pseudo_init", self.pseudo_init, PSEUDO_INITS)
        dims = DEFAULT_HIDDEN_DIMS[self.arch] if self.hidden_dims is None else self.hidden_dims
        object.__setattr__(self, "hidden_dims", _int_tuple("hidden_dims", dims))
        for name in ("latent_dim", "epochs", "batch_size", "train_k", "eval_k"):
            _check_int(name, getattr(self, name), 1)
        _check_int("kl_warmup_epochs", self.kl_warmup_epochs, 0)
        _check_int("seed", self.seed, 0)
        _check_float("lr", self.lr, positive=True)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_float("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise _fail("weight_decay", "a number >= 0", self.weight_decay)
        _check_float("ema_decay", self.ema_decay)
        if not 0 <= self.ema_decay < 1:
            raise _fail("ema_decay", "a number in [0, 1)", self.ema_decay)
        _check_float("val_fraction", self.val_fraction)
        if not 0 <= self.val_fraction <= 0.5:
            raise _fail("val_fraction", "a share in [0, 0.5]", self.val_fraction)
        _check_float("beta", self.beta)
        if self.beta < 0:
            raise _fail("beta", "a number >= 0", self.beta)
        _check_float("gaussian_sigma", self.gaussian_sigma, positive=True)
        _check_choice("device", self.device, DEVICES)
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, 1)
        _check_float("save_interval_s", self.save_interval_s)
        if self.save_interval_s < 0:
            raise _fail("save_interval_s", "seconds >= 0", self.save_interval_s)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise _fail("dataset", "a dataset spec string", self.dataset)

    def model_config(self, data_shape: tuple[int, ...], num_classes: int | None) -> ModelConfig:
        """Returns the ModelConfig of this run for data of `data_shape` with `num_classes`."""
        return ModelConfig(
            kind=self.model,
            conditioning=self.conditioning,
            arch=self.arch,
            likelihood=self.likelihood,
            data_shape=tuple(data_shape),
            latent_dim=self.latent_dim,
            hidden_dims=self.hidden_dims,
            num_classes=num_classes if self.model == "cvae" else None,
            gaussian_sigma=self.gaussian_sigma,
            prior=self.prior,
            prior_components=self.prior_components if self.prior == "vamp" else None,
            prior_mean_scale=self.prior_mean_scale if self.conditioning == "prior" else 0.0,
        )

    def replace(self, **changes: Any) -> TrainConfig:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config from `to_dict()` output.

        Raises:
            ValueError: a field is unknown or has a bad value; the message names it.
        """
        if isinstance(d, dict):  # a stored run from before a field: that field's old meaning
            d = {**_BEFORE_FIELDS, **d}
            # --dropout was removed (it lost every measurement, docs/training.md): a run
            # without it reads as before; one trained with it cannot be continued as it was.
            dropout = d.pop("dropout", 0.0)
            if dropout:
                raise ValueError(
                    f"dropout: this run was trained with dropout {dropout!r}, an option that "
                    "was removed; it can be evaluated and exported, not resumed"
                )
        return _from_dict(cls, d, ("hidden_dims",))
