"""What a manifest holds: ModelManifest, its JSON form, and the rules its fields obey.

Also the one table of which decoder outputs each likelihood of p(x|z) has: training names the
model's outputs from it, the exporter declares the graph's outputs from it, and the server
finds E[x|z] by it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from vaeserve.errors import ManifestError
from vaeserve.manifest.fields import FieldReader
from vaeserve.manifest.graphs import DTYPES, GraphSpec, TensorSpec, read_graph
from vaeserve.manifest.prior import PriorSpec, read_prior

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MIXTURE_FORMAT_VERSION",
    "DECODER_OUTPUTS",
    "LIKELIHOODS",
    "mean_output_name",
    "validate_model_name",
    "ModelManifest",
]

MANIFEST_FORMAT_VERSION = 1
# A version with a learned mixture prior (field 'prior') is written as format 2, so that a
# vaeserve older than the field refuses it instead of serving it with N(0, I); every other
# version is still written as format 1, byte for byte as before.
MIXTURE_FORMAT_VERSION = 2

_KINDS = ("vae", "cvae")
_CONDITIONINGS = ("concat", "prior")
# The decoder's outputs for each likelihood of p(x|z), in the order VAE.decode returns them;
# they are also the decoder graph's output names. The first holds E[x|z] (Bernoulli
# probabilities or the Gaussian mean); a learned-sigma Gaussian adds its per-pixel log sigma.
DECODER_OUTPUTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "bernoulli": ("probs",),
        "gaussian": ("mean",),
        "gaussian-learned": ("mean", "log_sigma"),
    }
)
LIKELIHOODS = tuple(DECODER_OUTPUTS)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def mean_output_name(likelihood: str) -> str:
    """Name of the decoder output holding E[x|z] under ``likelihood``.

    Raises:
        ValueError: ``likelihood`` is not one of ``LIKELIHOODS``.
    """
    outputs = DECODER_OUTPUTS.get(likelihood)
    if outputs is None:
        raise ValueError(f"likelihood is {likelihood!r}, expected one of {list(LIKELIHOODS)}")
    return outputs[0]


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is usable as a model name (a folder name and a gRPC field).

    Raises:
        ValueError: naming what is expected.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"model name {name!r} is invalid: expected 1-64 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ModelManifest:
    """Everything the server and clients know about one model version.

    ``prior_means`` is set for a ``prior`` CVAE: z of class y is drawn from N(prior_means[y], I).
    ``prior`` is set for a VAE with a learned mixture prior (``vaeserve.manifest.prior``);
    without either, p(z) is N(0, I).
    """

    name: str
    version: int
    kind: Literal["vae", "cvae"]
    conditioning: Literal["concat", "prior"] | None
    latent_dim: int
    num_classes: int | None
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    sample_dtype: str
    value_range: tuple[float, float]
    likelihood: Literal["bernoulli", "gaussian", "gaussian-learned"]
    encoder: GraphSpec
    decoder: GraphSpec
    opset: int
    gaussian_sigma: float | None = None
    prior_means: tuple[tuple[float, ...], ...] | None = None
    prior: PriorSpec | None = None
    producers: dict[str, str] = field(default_factory=dict)
    training_metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    # Provenance: the checkpoint (path, sha256, epoch), the data set, the graphs' precision.
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_output(self) -> str:
        """Name of the decoder output holding E[x|z] (probabilities or Gaussian mean)."""
        return mean_output_name(self.likelihood)

    @property
    def encoder_takes_label(self) -> bool:
        return "y" in self.encoder.inputs

    @property
    def decoder_takes_label(self) -> bool:
        return "y" in self.decoder.inputs

    @property
    def format_version(self) -> int:
        return _format_for(self.prior)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "conditioning": self.conditioning,
            "latent_dim": self.latent_dim,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "sample_shape": list(self.sample_shape),
            "sample_dtype": self.sample_dtype,
            "value_range": list(self.value_range),
            "likelihood": self.likelihood,
            "gaussian_sigma": self.gaussian_sigma,
            "prior_means": None
            if self.prior_means is None
            else [list(row) for row in self.prior_means],
            **({} if self.prior is None else {"prior": self.prior.to_dict()}),
            "opset": self.opset,
            "encoder": self.encoder.to_dict(),
            "decoder": self.decoder.to_dict(),
            "producers": dict(self.producers),
            "training_metrics": dict(self.training_metrics),
            "parity": dict(self.parity),
            "created_at": self.created_at,
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> ModelManifest:
        """Build and validate a manifest; errors name ``source`` and the field.

        Raises:
            ManifestError: a missing or malformed field, or fields that disagree.
        """
        r = FieldReader(data, source)
        fmt = r.int("format_version", minimum=1)
        if fmt not in (MANIFEST_FORMAT_VERSION, MIXTURE_FORMAT_VERSION):
            raise ManifestError(
                f"{source}: format_version is {fmt}, this vaeserve reads "
                f"{MANIFEST_FORMAT_VERSION} and {MIXTURE_FORMAT_VERSION}; re-export the model "
                "with this version"
            )
        prior = read_prior(data.get("prior"), source)
        if fmt != _format_for(prior):
            raise ManifestError(
                f"{source}: format_version is {fmt}, expected {MIXTURE_FORMAT_VERSION} with a "
                f"mixture prior (field 'prior') and {MANIFEST_FORMAT_VERSION} without one; "
                f"this manifest {'has' if prior else 'has no'} 'prior'"
            )
        kind = r.choice("kind", _KINDS)
        conditioning = r.choice("conditioning", _CONDITIONINGS, optional=kind == "vae")
        if kind == "vae" and conditioning is not None:
            raise ManifestError(f"{source}: field 'conditioning' must be null for kind 'vae'")
        num_classes = r.int("num_classes", minimum=2, optional=kind == "vae")
        if kind == "vae" and num_classes is not None:
            raise ManifestError(f"{source}: field 'num_classes' must be null for kind 'vae'")
        latent_dim = r.int("latent_dim", minimum=1)
        likelihood = r.choice("likelihood", LIKELIHOODS)
        manifest = cls(
            name=_name(r),
            version=r.int("version", minimum=1),
            kind=kind,
            conditioning=conditioning,
            latent_dim=latent_dim,
            num_classes=num_classes,
            class_names=r.strings("class_names", num_classes or 0, counted_by="num_classes"),
            sample_shape=r.shape("sample_shape"),
            sample_dtype=r.choice("sample_dtype", DTYPES),
            value_range=r.value_range("value_range"),
            likelihood=likelihood,
            gaussian_sigma=r.positive_float("gaussian_sigma", optional=likelihood != "gaussian"),
            prior_means=_prior_means(r, conditioning == "prior", num_classes, latent_dim),
            prior=prior,
            opset=r.int("opset", minimum=7),
            encoder=read_graph(r, "encoder"),
            decoder=read_graph(r, "decoder"),
            producers=r.mapping("producers"),
            training_metrics=r.mapping("training_metrics"),
            parity=r.mapping("parity"),
            created_at=str(data.get("created_at", "")),
            source=r.mapping("source"),
        )
        if prior is not None and kind != "vae":
            raise ManifestError(
                f"{source}: field 'prior' is a mixture, expected null for kind {kind!r} (a "
                "CVAE's prior is N(0, I) or its class means)"
            )
        _check_graph_contract(manifest, source)
        return manifest


def _name(r: FieldReader) -> str:
    try:
        return validate_model_name(r.get("name", optional=False))
    except ValueError as exc:
        raise ManifestError(f"{r.source}: field 'name': {exc}") from None


def _prior_means(
    r: FieldReader, required: bool, num_classes: int | None, latent_dim: int
) -> tuple[tuple[float, ...], ...] | None:
    if not required:
        if r.get("prior_means", optional=True) is not None:
            raise r.fail("prior_means", "null unless conditioning is 'prior'")
        return None
    assert num_classes is not None, "a prior CVAE has num_classes (checked before)"
    return r.matrix("prior_means", rows=num_classes, cols=latent_dim)


def _check_graph_contract(m: ModelManifest, source: str) -> None:
    """The graphs' declared tensors must agree with the model-level fields."""
    sample = (-1, *m.sample_shape)
    latent = (-1, m.latent_dim)
    label = TensorSpec("int64", (-1,))
    # concat CVAEs condition both graphs on y; a prior CVAE and a VAE condition neither.
    label_inputs = m.conditioning == "concat"
    expected_encoder_inputs = {"x": TensorSpec(m.sample_dtype, sample)}
    expected_decoder_inputs = {"z": TensorSpec("float32", latent)}
    if label_inputs:
        expected_encoder_inputs["y"] = label
        expected_decoder_inputs["y"] = label
    expected_outputs = {
        name: TensorSpec(m.sample_dtype, sample) for name in DECODER_OUTPUTS[m.likelihood]
    }
    checks = [
        ("encoder.inputs", m.encoder.inputs, expected_encoder_inputs),
        (
            "encoder.outputs",
            m.encoder.outputs,
            {"mu": TensorSpec("float32", latent), "logvar": TensorSpec("float32", latent)},
        ),
        ("decoder.inputs", m.decoder.inputs, expected_decoder_inputs),
        ("decoder.outputs", m.decoder.outputs, expected_outputs),
    ]
    for where, declared, expected in checks:
        if set(declared) != set(expected):
            raise ManifestError(
                f"{source}: field '{where}' names {sorted(declared)}, "
                f"expected {sorted(expected)} for a {m.kind} ({m.conditioning or 'unconditional'}, "
                f"{m.likelihood})"
            )
        for name, spec in expected.items():
            got = declared[name]
            if got != spec:
                raise ManifestError(
                    f"{source}: field '{where}.{name}' is {got.dtype}{list(got.shape)}, "
                    f"expected {spec.dtype}{list(spec.shape)}"
                )


def _format_for(prior: PriorSpec | None) -> int:
    """The format_version a manifest with (or without) a mixture prior is written in."""
    return MANIFEST_FORMAT_VERSION if prior is None else MIXTURE_FORMAT_VERSION
