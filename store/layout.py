"""The run-layout catalogue: every file a run directory may hold, declared once.

Everything that opens or writes a run directory names its files through this module: `RunPaths` resolves the
declared names to paths and refuses undeclared ones, so a new artifact is added here (with the stage or job
that writes it) before any code can use it. Layout of a run directory::

    manifest.json                 what the run holds (store.manifest)
    metadata.sqlite               example metadata, suspects, tombstones (store.metadata), decisions (store.decisions)
    head.safetensors              the head's parameters
    vectors/<space>.faiss         one FAISS index per vector space (ids = example ids)
    arrays/<name>.npy             per-example and derived arrays (ARRAYS below)
    arrays/<name>.json            sidecars: the config a job cache was computed with (CACHES)
    arrays/<split>_strings_NNNNN.json   content hashes and previews of one chunk of the features stage
    shards/<array>/NNNNN.npz      one chunk of a per-example array computed by a worker of a distributed build
                                  (store.shards; removed once the driver has committed the stage)
    dumps/<job>.json, dumps/<job>.parquet ...   dump jobs of the HTTP service (api.jobs)
    <figure>.png                  figures the CLI draws by default (FIGURES)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One declared file of a run directory.

    Attributes:
        name: The file stem (``arrays/<name>.npy``, ``vectors/<name>.faiss``).
        writer: The build stage or job that writes it.
        doc: What it holds, with its shape in named dimensions.
    """

    name: str
    writer: str
    doc: str


def _catalogue(*artifacts: Artifact) -> dict[str, Artifact]:
    return {a.name: a for a in artifacts}


def _per_split(stem: str, writer: str, doc: str) -> tuple[Artifact, ...]:
    return tuple(Artifact(f"{split}_{stem}", writer, doc.replace("<split>", split)) for split in SPLITS)


#: ``arrays/<name>.npy``
ARRAYS: dict[str, Artifact] = _catalogue(
    *_per_split("features", "features", "cut features h_i of the <split> examples [n_<split>, *feature_shape]"),
    *_per_split("labels", "features", "labels of the <split> examples [n_<split>] int64"),
    *_per_split("ids", "metadata", "example ids of the <split> rows [n_<split>] int64"),
    *_per_split("logits", "metadata", "head logits of the <split> examples [n_<split>, n_classes]"),
    Artifact(
        "grad_vectors", "grad", "head gradients g_i at their labels (projected when the head is large) [n_train, d]"
    ),
    Artifact("train_phi", "representer", "augmented penultimate features [phi_i, 1] [n_train, f + 1]"),
    Artifact("representer_alpha", "representer", "representer weights alpha_i [n_train, n_classes]"),
    Artifact("representer_theta", "representer", "the fitted last layer Theta* [n_classes, f + 1]"),
    Artifact("curvature_top_eigenvalues", "curvature", "top eigenvalues of C + l2 I, descending [r] float64"),
    Artifact("curvature_top_eigenvectors", "curvature", "their eigenvectors [p, r]"),
    Artifact("curvature_eigenvalues", "curvature", "every eigenvalue of C + l2 I (small heads) [p] float64"),
    Artifact("curvature_eigenvectors", "curvature", "every eigenvector of C + l2 I (small heads) [p, p] float64"),
    Artifact(
        "curvature_dense_rows",
        "curvature",
        "rows of C + l2 I written in resumable chunks while the stage runs, removed when it ends [p, p] float64",
    ),
    Artifact("whitened_vectors", "whitened", "projected whitened head gradients P K^-1/2 g_i [n_train, d] float32"),
    Artifact("kronecker_bases", "kronecker", "K-FAC eigenbases Q_A [k, k], Q_G [out, out] per linear layer, raveled"),
    Artifact("kfac_eigenvalues", "kronecker", "K-FAC eigenvalues lambda_G lambda_A^T per block, raveled [p] float64"),
    Artifact("ekfac_eigenvalues", "kronecker", "EK-FAC corrected eigenvalues per block, raveled [p] float64"),
    Artifact(
        "kronecker_factor_sums",
        "kronecker",
        "scratch of a distributed build: per-chunk partial sums of the K-FAC factors (shards only, removed)",
    ),
    Artifact(
        "kronecker_correction_sums",
        "kronecker",
        "scratch of a distributed build: per-chunk partial sums of the EK-FAC correction (shards only, removed)",
    ),
    Artifact("tracin_self_influence", "tracin", "TracIn self-influence sum_c eta_c |g_i(theta_c)|^2 [n_train]"),
    Artifact("query_solutions", "queries", "LiSSA vectors (C + l2 I + dI)^-1 g_q of the stored tests [n_test, p]"),
    Artifact("query_targets", "queries", "the class each cached query vector was taken at [n_test] int64"),
    Artifact("query_residuals", "queries", "relative residual of each cached solve [n_test]"),
    Artifact("query_depths", "queries", "LiSSA depth of each cached block of solves [n_test]"),
    Artifact("block_train_vectors", "block", "projected last-block gradients S^T g_i at their labels [n_train, d]"),
    Artifact("block_test_vectors", "block", "projected last-block gradients of the tests at their target [n_test, d]"),
    Artifact("block_test_targets", "block", "the class of each stored test vector [n_test] int64"),
    Artifact("block_curvature", "block", "A = S^T C S + l2 S^T S [d, d] float64"),
    Artifact("block_gram", "block", "B = S^T S [d, d] float64"),
    Artifact(
        "model_train_vectors", "model", "projected per-layer gradients phi_i = S^T g_i at the labels [n_train, d]"
    ),
    Artifact("model_test_vectors", "model", "projected per-layer gradients of the tests at their target [n_test, d]"),
    Artifact("model_test_targets", "model", "the class of each stored test vector [n_test] int64"),
    Artifact("model_curvature", "model-curvature", "G + l2 I, G the projected Gauss-Newton matrix [d, d] float64"),
    Artifact(
        "model_kronecker_bases",
        "model-curvature",
        "K-FAC eigenbases Q_A [k_in, k_in], Q_S [k_out, k_out] per outer-product layer of phi, raveled",
    ),
    Artifact("model_kfac_eigenvalues", "model-curvature", "K-FAC eigenvalues of phi's blocks, raveled [d] float64"),
    Artifact("model_ekfac_eigenvalues", "model-curvature", "EK-FAC eigenvalues of phi's blocks, raveled [d] float64"),
    Artifact("noise_self_influence", "noise job", "self-influence of every training example [n_train]"),
    Artifact("noise_oos_probs", "noise job", "out-of-sample class probabilities [n_train, n_classes]"),
)

#: job caches among ARRAYS: each has a sidecar ``arrays/<name>.json`` with the config it was computed with
CACHES = ("noise_self_influence", "noise_oos_probs")

#: ``vectors/<space>.faiss``
SPACES: dict[str, Artifact] = _catalogue(
    Artifact("grad", "grad", "head gradients g_i (projected when the head is large)"),
    Artifact("grad-unit", "grad", "g_i / |g_i|"),
    Artifact("representer", "representer", "vec(alpha_i phi_i^T)"),
    Artifact("grad-whitened", "whitened", "P K^-1/2 g_i: projected gradients whitened by the EK-FAC"),
    Artifact("block", "block", "projected last-block gradients S^T g_i"),
    Artifact("block-unit", "block", "S^T g_i / |S^T g_i|"),
    Artifact("model", "model", "projected per-layer gradients S^T g_i of scope='model'"),
    Artifact("model-unit", "model", "S^T g_i / |S^T g_i| of scope='model'"),
)

#: ``<name>.png`` at the top of a run: what the CLI draws by default
FIGURES: dict[str, Artifact] = _catalogue(
    Artifact("explanations", "influence demo", "proponents and opponents of misclassified test examples"),
)

_JOB = re.compile(r"^[0-9a-f]{16}$")


def _check(name: str, catalogue: dict[str, Artifact], what: str) -> str:
    if name not in catalogue:
        raise ValueError(f"{what}: {name!r} is not in the run layout (store.layout); declared: {sorted(catalogue)}")
    return name


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each declared file of a run directory lives.

    Attributes:
        root: The run directory.
    """

    root: Path

    def __post_init__(self) -> None:
        if not isinstance(self.root, str | os.PathLike):
            raise ValueError(f"root: must be a path, got {self.root!r}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        """``manifest.json``."""
        return self.root / MANIFEST_NAME

    @property
    def metadata(self) -> Path:
        """``metadata.sqlite``."""
        return self.root / "metadata.sqlite"

    @property
    def head(self) -> Path:
        """``head.safetensors`` (the head parameters)."""
        return self.root / "head.safetensors"

    @property
    def lock(self) -> Path:
        """``.lock`` (held by a build in progress)."""
        return self.root / ".lock"

    @property
    def vectors_dir(self) -> Path:
        """``vectors/``."""
        return self.root / "vectors"

    @property
    def arrays_dir(self) -> Path:
        """``arrays/``."""
        return self.root / "arrays"

    @property
    def dumps_dir(self) -> Path:
        """``dumps/`` (dump jobs of the HTTP service)."""
        return self.root / "dumps"

    @property
    def shards_dir(self) -> Path:
        """``shards/`` (chunks computed by the workers of a distributed build, `store.shards`)."""
        return self.root / "shards"

    def shard(self, name: str, chunk: int) -> Path:
        """``shards/<name>/NNNNN.npz``: chunk ``chunk`` of the declared array ``name`` as a worker computed it."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"chunk: must be an int >= 0, got {chunk!r}")
        return self.shards_dir / _check(name, ARRAYS, "array") / f"{chunk:05d}.npz"

    def vector(self, space: str) -> Path:
        """``vectors/<space>.faiss`` of a declared space."""
        return self.vectors_dir / f"{_check(space, SPACES, 'space')}.faiss"

    def array(self, name: str) -> Path:
        """``arrays/<name>.npy`` of a declared array."""
        return self.arrays_dir / f"{_check(name, ARRAYS, 'array')}.npy"

    def split_array(self, split: str, stem: str) -> Path:
        """``arrays/<split>_<stem>.npy`` (e.g. ``train_features``)."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        return self.array(f"{split}_{stem}")

    def cache_config(self, name: str) -> Path:
        """``arrays/<name>.json``: the config the job cache ``name`` was computed with."""
        if name not in CACHES:
            raise ValueError(f"cache: {name!r} is not a declared job cache; declared: {CACHES}")
        return self.arrays_dir / f"{name}.json"

    def strings(self, split: str, chunk: int) -> Path:
        """``arrays/<split>_strings_NNNNN.json``: content hashes and previews of one features chunk."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"chunk: must be an int >= 0, got {chunk!r}")
        return self.arrays_dir / f"{split}_strings_{chunk:05d}.json"

    def dump_job(self, job: str, suffix: str = ".json") -> Path:
        """``dumps/<job><suffix>`` of a dump job id (16 hex digits): its record or its output file."""
        if not isinstance(job, str) or not _JOB.match(job):
            raise ValueError(f"job: must be 16 hex digits, got {job!r}")
        if suffix not in (".json", ".parquet"):
            raise ValueError(f"suffix: must be '.json' or '.parquet', got {suffix!r}")
        return self.dumps_dir / f"{job}{suffix}"

    def figure(self, name: str) -> Path:
        """``<name>.png`` of a declared figure."""
        return self.root / f"{_check(name, FIGURES, 'figure')}.png"

    def create_dirs(self) -> None:
        """Creates the run directory and its ``vectors/`` and ``arrays/`` subdirectories."""
        for d in (self.root, self.vectors_dir, self.arrays_dir):
            d.mkdir(parents=True, exist_ok=True)
