"""The model manifest: the one source of truth about a published model version.

Written by the exporter, read by the server (and through ``GetModelInfo`` by clients). This
package must stay free of torch and onnx: the serving install has neither. Its parts:
``schema`` (what a manifest holds and the rules its fields obey), ``graphs`` (how it declares
one graph's tensors), ``fields`` (typed reading of JSON fields), ``files`` (manifest.json and
version folders on disk) and ``checking`` (a manifest against its graph files and the graphs'
real inputs and outputs) and ``prior`` (a learned mixture prior's field and file).
"""

from vaeserve.errors import ManifestError
from vaeserve.manifest.checking import check_graph_io, sha256_of_file, verify_files
from vaeserve.manifest.files import (
    DIR_MODE,
    FILE_MODE,
    MANIFEST_FILE,
    is_version_name,
    list_versions,
    load_version_manifest,
    read_manifest,
    write_manifest,
)
from vaeserve.manifest.graphs import GraphSpec, TensorSpec
from vaeserve.manifest.prior import PRIOR_FILE, PriorSpec, read_mixture, write_mixture
from vaeserve.manifest.schema import (
    DECODER_OUTPUTS,
    LIKELIHOODS,
    MANIFEST_FORMAT_VERSION,
    MIXTURE_FORMAT_VERSION,
    ModelManifest,
    mean_output_name,
    validate_model_name,
)

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT_VERSION",
    "MIXTURE_FORMAT_VERSION",
    "PRIOR_FILE",
    "PriorSpec",
    "read_mixture",
    "write_mixture",
    "FILE_MODE",
    "DIR_MODE",
    "DECODER_OUTPUTS",
    "LIKELIHOODS",
    "ManifestError",
    "TensorSpec",
    "GraphSpec",
    "ModelManifest",
    "mean_output_name",
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
