"""The model manifest: the one source of truth about a published model version.

Written by the exporter, read by the server (and through ``GetModelInfo`` by clients). This
module must stay free of torch and onnx: the serving install has neither.

Layout of a model repository::

    <repository>/<name>/<version>/encoder.onnx
    <repository>/<name>/<version>/decoder.onnx
    <repository>/<name>/<version>/manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vaeserve.atomic import write_atomically
from vaeserve.errors import ManifestError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT_VERSION",
    "ManifestError",
    "TensorSpec",
    "GraphSpec",
    "ModelManifest",
    "validate_model_name",
    "sha256_of_file",
    "read_manifest",
    "write_manifest",
    "verify_files",
    "check_graph_io",
    "is_version_name",
    "list_versions",
    "load_version_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1

# Wire and file dtypes we support, by numpy name. onnxruntime reports "tensor(<onnx name>)".
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
_DTYPES = frozenset(_ORT_TYPES.values())
_KINDS = ("vae", "cvae")
_CONDITIONINGS = ("concat", "prior")
_LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned")
# The decoder output that holds the mean of p(x|z), by likelihood.
MEAN_OUTPUT = {"bernoulli": "probs", "gaussian": "mean", "gaussian-learned": "mean"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# A published version is a folder named by a positive decimal integer without leading zeros.
# Anything else in a model folder (notably the exporter's ".staging-*" folders) is not a version.
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")
# Files and folders of a version are published world-readable: the server may run as another
# (non-root) user than the exporter, and mkstemp/mkdtemp create them private (0600/0700).
FILE_MODE = 0o644
DIR_MODE = 0o755


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
class TensorSpec:
    """dtype (numpy name) and shape, -1 for the dynamic batch axis."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a version: its file, checksum and declared inputs/outputs."""

    file: str
    sha256: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }


@dataclass(frozen=True)
class ModelManifest:
    """Everything the server and clients know about one model version.

    ``prior_means`` is set for a ``prior`` CVAE: z of class y is drawn from N(prior_means[y], I).
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
    producers: dict[str, str] = field(default_factory=dict)
    training_metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    # Provenance: the checkpoint (path, sha256, epoch), the data set, the graphs' precision.
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_output(self) -> str:
        """Name of the decoder output holding E[x|z] (probabilities or Gaussian mean)."""
        return MEAN_OUTPUT[self.likelihood]

    @property
    def encoder_takes_label(self) -> bool:
        return "y" in self.encoder.inputs

    @property
    def decoder_takes_label(self) -> bool:
        return "y" in self.decoder.inputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": MANIFEST_FORMAT_VERSION,
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
        r = _Reader(data, source)
        fmt = r.int("format_version", minimum=1)
        if fmt != MANIFEST_FORMAT_VERSION:
            raise ManifestError(
                f"{source}: format_version is {fmt}, this vaeserve reads "
                f"{MANIFEST_FORMAT_VERSION}; re-export the model with this version"
            )
        kind = r.choice("kind", _KINDS)
        conditioning = r.choice("conditioning", _CONDITIONINGS, optional=kind == "vae")
        if kind == "vae" and conditioning is not None:
            raise ManifestError(f"{source}: field 'conditioning' must be null for kind 'vae'")
        num_classes = r.int("num_classes", minimum=2, optional=kind == "vae")
        if kind == "vae" and num_classes is not None:
            raise ManifestError(f"{source}: field 'num_classes' must be null for kind 'vae'")
        latent_dim = r.int("latent_dim", minimum=1)
        likelihood = r.choice("likelihood", _LIKELIHOODS)
        manifest = cls(
            name=r.name(),
            version=r.int("version", minimum=1),
            kind=kind,
            conditioning=conditioning,
            latent_dim=latent_dim,
            num_classes=num_classes,
            class_names=r.class_names(num_classes),
            sample_shape=r.shape("sample_shape"),
            sample_dtype=r.choice("sample_dtype", tuple(sorted(_DTYPES))),
            value_range=r.value_range(),
            likelihood=likelihood,
            gaussian_sigma=r.positive_float("gaussian_sigma", optional=likelihood != "gaussian"),
            prior_means=r.prior_means(conditioning == "prior", num_classes, latent_dim),
            opset=r.int("opset", minimum=7),
            encoder=r.graph("encoder"),
            decoder=r.graph("decoder"),
            producers=r.mapping("producers"),
            training_metrics=r.mapping("training_metrics"),
            parity=r.mapping("parity"),
            created_at=str(data.get("created_at", "")),
            source=r.mapping("source"),
        )
        _check_graph_contract(manifest, source)
        return manifest


class _Reader:
    """Typed field access for ``from_dict``, so each error names the file and the field."""

    def __init__(self, data: Mapping[str, Any], source: str):
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: expected a JSON object at the top level")
        self.data = data
        self.source = source

    def _fail(self, key: str, expected: str) -> ManifestError:
        got = self.data.get(key, "<missing>")
        return ManifestError(f"{self.source}: field '{key}' is {got!r}, expected {expected}")

    def _get(self, key: str, optional: bool) -> Any:
        value = self.data.get(key)
        if value is None and not optional:
            raise self._fail(key, "a value")
        return value

    def name(self) -> str:
        try:
            return validate_model_name(self._get("name", optional=False))
        except ValueError as exc:
            raise ManifestError(f"{self.source}: field 'name': {exc}") from None

    def int(self, key: str, minimum: int, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(key, f"an integer >= {minimum}")
        return value

    def positive_float(self, key: str, optional: bool) -> float | None:
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self._fail(key, "a positive number")
        return float(value)

    def choice(self, key: str, options: tuple[str, ...], optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is not None and value not in options:
            raise self._fail(key, "one of " + ", ".join(repr(o) for o in options))
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self._get(key, optional=False)
        if not _is_dims(value, allow_batch=False) or not value:
            raise self._fail(key, "a non-empty list of positive integers")
        return tuple(value)

    def value_range(self) -> tuple[float, float]:
        value = self._get("value_range", optional=False)
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not value[0] < value[1]
        ):
            raise self._fail("value_range", "[low, high] with low < high")
        return float(value[0]), float(value[1])

    def class_names(self, num_classes: int | None) -> tuple[str, ...]:
        value = self.data.get("class_names") or []
        expected = num_classes or 0
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail("class_names", "a list of strings")
        if len(value) != expected:
            raise self._fail("class_names", f"{expected} names (num_classes)")
        return tuple(value)

    def prior_means(
        self, required: bool, num_classes: int | None, latent_dim: int
    ) -> tuple[tuple[float, ...], ...] | None:
        value = self._get("prior_means", optional=not required)
        if not required:
            if value is not None:
                raise self._fail("prior_means", "null unless conditioning is 'prior'")
            return None
        ok = (
            isinstance(value, list)
            and len(value) == num_classes
            and all(
                isinstance(row, list)
                and len(row) == latent_dim
                and all(_is_finite_number(v) for v in row)
                for row in value
            )
        )
        if not ok:
            raise self._fail("prior_means", f"{num_classes} rows of {latent_dim} finite numbers")
        return tuple(tuple(float(v) for v in row) for row in value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise self._fail(key, "a JSON object")
        return dict(value)

    def graph(self, key: str) -> GraphSpec:
        value = self._get(key, optional=False)
        where = f"{self.source}: field '{key}'"
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where} is not a JSON object")
        file = value.get("file")
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file[0] == ".":
            raise ManifestError(f"{where}.file is {file!r}, expected a plain file name")
        sha = value.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ManifestError(f"{where}.sha256 is {sha!r}, expected 64 lowercase hex digits")
        return GraphSpec(
            file=file,
            sha256=sha,
            inputs=_tensor_specs(value.get("inputs"), f"{where}.inputs"),
            outputs=_tensor_specs(value.get("outputs"), f"{where}.outputs"),
        )


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")


def _is_dims(value: Any, allow_batch: bool) -> bool:
    if not isinstance(value, list):
        return False
    for i, d in enumerate(value):
        if isinstance(d, bool) or not isinstance(d, int):
            return False
        if not (d > 0 or (allow_batch and i == 0 and d == -1)):
            return False
    return True


def _tensor_specs(value: Any, where: str) -> dict[str, TensorSpec]:
    if not isinstance(value, Mapping) or not value:
        raise ManifestError(f"{where} is {value!r}, expected a non-empty object of tensors")
    specs = {}
    for name, spec in value.items():
        if not isinstance(spec, Mapping):
            raise ManifestError(f"{where}.{name} is not an object with dtype and shape")
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in _DTYPES:
            raise ManifestError(
                f"{where}.{name}.dtype is {dtype!r}, expected one of {sorted(_DTYPES)}"
            )
        if not _is_dims(shape, allow_batch=True) or not shape or shape[0] != -1:
            raise ManifestError(
                f"{where}.{name}.shape is {shape!r}, expected [-1, positive dims...] "
                "(-1 is the batch axis)"
            )
        specs[str(name)] = TensorSpec(dtype=dtype, shape=tuple(shape))
    return specs


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
    expected_outputs = {m.mean_output: TensorSpec(m.sample_dtype, sample)}
    if m.likelihood == "gaussian-learned":
        expected_outputs["log_sigma"] = TensorSpec(m.sample_dtype, sample)
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


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """Read and validate ``manifest.json`` (schema only; see ``verify_files``).

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ManifestError: not JSON, or a field is malformed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest (expected {MANIFEST_FILE})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    return ModelManifest.from_dict(data, source=str(path))


def write_manifest(manifest: ModelManifest, path: str | os.PathLike[str]) -> None:
    """Write ``manifest`` as JSON atomically (temp file in the same folder, then rename)."""
    # allow_nan=False: NaN/Infinity are not JSON, and other clients' parsers reject them.
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def verify_files(manifest: ModelManifest, version_dir: str | os.PathLike[str]) -> None:
    """Check that each graph file exists and matches its recorded sha256.

    Raises:
        ManifestError: naming the file that is missing or differs.
    """
    version_dir = Path(version_dir)
    for role, graph in (("encoder", manifest.encoder), ("decoder", manifest.decoder)):
        path = version_dir / graph.file
        if not path.is_file():
            raise ManifestError(f"{path}: {role} graph file is missing")
        actual = sha256_of_file(path)
        if actual != graph.sha256:
            raise ManifestError(
                f"{path}: sha256 is {actual}, manifest field '{role}.sha256' says {graph.sha256}"
            )


def check_graph_io(
    graph: GraphSpec,
    actual_inputs: Iterable[tuple[str, str, list[Any]]],
    actual_outputs: Iterable[tuple[str, str, list[Any]]],
    source: str,
) -> None:
    """Compare a graph's real inputs/outputs with what the manifest declares.

    Args:
        graph: the manifest's declaration.
        actual_inputs / actual_outputs: (name, onnxruntime type string such as
            "tensor(float)", shape with a string or None for symbolic axes), as reported by
            ``onnxruntime.InferenceSession.get_inputs()`` / ``get_outputs()``.
        source: the graph file, for messages.

    Raises:
        ManifestError: naming the file and the tensor that disagrees.
    """
    for kind, declared, actual in (
        ("input", graph.inputs, list(actual_inputs)),
        ("output", graph.outputs, list(actual_outputs)),
    ):
        names = [name for name, _, _ in actual]
        if sorted(names) != sorted(declared):
            raise ManifestError(
                f"{source}: graph {kind}s are {names}, manifest declares {list(declared)}"
            )
        for name, ort_type, shape in actual:
            spec = declared[name]
            dtype = _ORT_TYPES.get(ort_type, ort_type)
            dims = [d if isinstance(d, int) else -1 for d in shape]
            if dtype != spec.dtype or dims != list(spec.shape):
                raise ManifestError(
                    f"{source}: {kind} '{name}' is {dtype}{dims} in the graph, "
                    f"manifest declares {spec.dtype}{list(spec.shape)}"
                )


def is_version_name(name: str) -> bool:
    """True if ``name`` is a published version folder's name ("1", "2", ...; no leading 0)."""
    return bool(_VERSION_RE.match(name))


def list_versions(model_dir: str | os.PathLike[str]) -> list[int]:
    """The published versions in ``<repository>/<name>``, ascending.

    Folders that are not a version number are skipped: the exporter stages a version in a
    folder starting with "." and renames it into place only once it is complete.

    Raises:
        NotADirectoryError: ``model_dir`` exists but is not a folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return []
    if not model_dir.is_dir():
        raise NotADirectoryError(f"{model_dir}: expected a model folder of version folders")
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if is_version_name(entry.name) and entry.is_dir()
    )


def load_version_manifest(version_dir: str | os.PathLike[str]) -> ModelManifest:
    """Read and fully verify one published version folder, ``<repository>/<name>/<version>``.

    Checks the schema (``read_manifest``), that the folder is named after the manifest's
    ``version`` and its parent after its ``name``, and each graph's file and sha256
    (``verify_files``). The graphs' inputs/outputs need onnxruntime: see ``check_graph_io``.

    Raises:
        FileNotFoundError: no folder, or no manifest in it.
        ManifestError: naming the file and the field that is wrong.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise FileNotFoundError(f"{version_dir}: no such version folder")
    path = version_dir / MANIFEST_FILE
    manifest = read_manifest(path)
    if version_dir.name != str(manifest.version):
        raise ManifestError(
            f"{path}: field 'version' is {manifest.version}, but the version folder is "
            f"named {version_dir.name!r}"
        )
    if version_dir.resolve().parent.name != manifest.name:
        raise ManifestError(
            f"{path}: field 'name' is {manifest.name!r}, but the model folder is "
            f"named {version_dir.resolve().parent.name!r}"
        )
    verify_files(manifest, version_dir)
    return manifest
