"""Activation source: a directory with one file of causal importances per data batch.

Each file is one ensemble member; its partition key is the file name without its suffix.
A file maps module name -> float tensor `[batch, seq, C]` or `[samples, C]` (MATH.md §1).
Every file must match the experiment's layout: the same module names, in the same order, with
the same number of components C per module. That layout is the one most files of the directory
share (so an odd file fails alone, whatever its name), or the one declared in the config
(`layout:` module name -> C). The number of samples (batch and seq sizes) may differ between
files, but not between the modules of one file.

Module order is the order stored in the file: `.npz` keeps the order the arrays were saved
in and `.pt` the order of the saved dict. `.safetensors` cannot keep an order (its writer
sorts tensors), so its modules come in sorted name order, as `safe_open(...).keys()` reports.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from numpy.lib import format as npy_format
from safetensors import safe_open

from spd_assets.config.sources import DEFAULT_VALUE_RANGE, FilesSourceConfig
from spd_assets.errors import BatchFileError
from spd_assets.sources.base import PARTITION_KEY_FORBIDDEN, ActivationSource

SUPPORTED_SUFFIXES = (".safetensors", ".npz", ".pt")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
SUPPORTED_NDIMS = (2, 3)
EXPECTED_SHAPES = "[batch, seq, C] or [samples, C]"

_EXPECTED_CONTENT = {
    ".safetensors": "a file written by safetensors (e.g. safetensors.torch.save_file)",
    ".npz": "an archive of float arrays written by numpy.savez or numpy.savez_compressed",
    ".pt": (
        "a dict of module name -> torch.Tensor written by torch.save "
        "(tensors only: it is loaded with weights_only=True)"
    ),
}
_EXPECTED_DIRECTORY = f"a directory with one batch file ({', '.join(SUPPORTED_SUFFIXES)}) per ensemble member"
_SAFETENSORS_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

Layout = dict[str, tuple[int, ...]]
PathLike = str | os.PathLike[str]
TensorGetter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class _TensorSpec:
    """What a file's header says about one tensor, before any data is read."""

    shape: tuple[int, ...]
    dtype: str  # torch-style name ("float32"); safetensors codes of non-float types stay as stored ("I64")


def discover_batch_files(directory: PathLike) -> dict[str, Path]:
    """Partition key (file name without suffix) -> batch file, sorted by key.

    Hidden files are skipped: they are editor, OS or partial-write leftovers, not batches.
    """
    root = Path(directory)
    if not root.exists():
        raise BatchFileError(f"{root}: directory does not exist; expected {_EXPECTED_DIRECTORY}")
    if not root.is_dir():
        raise BatchFileError(f"{root}: is not a directory; expected {_EXPECTED_DIRECTORY}")
    paths_by_key: dict[str, list[Path]] = {}
    for path in root.iterdir():
        if path.suffix in SUPPORTED_SUFFIXES and not path.name.startswith(".") and path.is_file():
            paths_by_key.setdefault(path.stem, []).append(path)
    if not paths_by_key:
        raise BatchFileError(f"{root}: no batch files found; expected files ending in {', '.join(SUPPORTED_SUFFIXES)}")
    duplicates = [paths for paths in paths_by_key.values() if len(paths) > 1]
    if duplicates:
        raise BatchFileError(f"{root}: " + "; ".join(_duplicate_problem(paths) for paths in duplicates))
    return {key: paths_by_key[key][0] for key in sorted(paths_by_key)}


def read_layout(path: PathLike) -> Layout:
    """Module name -> tensor shape of one batch file, in file order, after checking its structure.

    Reads only the header of `.safetensors` and `.npz` files; a `.pt` file has to be loaded.
    """
    path = Path(path)
    with _open_batch_file(path) as (specs, _):
        return _validated_layout(path, specs)


def load_batch(
    directory: PathLike,
    partition_key: str,
    *,
    value_range: tuple[float, float] | None = DEFAULT_VALUE_RANGE,
    layout: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Read one ensemble member's batch file and check it against the directory's reference layout.

    The reference layout is `layout` (module name -> components C) when given; otherwise the
    layout most readable files of the directory share, so that an odd file fails alone whatever
    its name. Unreadable files take no part in the vote, and a tie is an error that asks for a
    declared layout. The vote is recomputed on every call (one header read per file, cached
    while a file is unchanged), so it stays right when files change.
    `value_range=None` skips the range check (e.g. for activations that are not CIs).
    """
    if value_range is not None and not value_range[0] <= value_range[1]:
        raise ValueError(f"value_range: expected (low, high) with low <= high, got {value_range!r}")
    root = Path(directory)
    path = _batch_file(root, partition_key)
    # Decided before opening `path`, so that no two files' data are held at once.
    reference = _declared_reference(layout) if layout is not None else _majority_reference(root, path)
    with _open_batch_file(path) as (specs, get_tensor):
        file_layout = _validated_layout(path, specs)
        _check_matches_reference(path, file_layout, reference)
        tensors = {name: get_tensor(name) for name in file_layout}
    problems = _value_problems(tensors, value_range)
    if problems:
        raise BatchFileError(_problems_message(path, "has invalid values", problems))
    return tensors


def _batch_file(root: Path, partition_key: str) -> Path:
    candidates = [root / f"{partition_key}{suffix}" for suffix in SUPPORTED_SUFFIXES]
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        raise BatchFileError(
            f"{root}: no batch file for partition {partition_key!r}; expected one of "
            f"{', '.join(path.name for path in candidates)} (deleted or renamed after the partitions were discovered?)"
        )
    if len(existing) > 1:
        raise BatchFileError(f"{root}: {_duplicate_problem(existing)}")
    return existing[0]


def _duplicate_problem(paths: list[Path]) -> str:
    names = ", ".join(sorted(path.name for path in paths))
    return f"files {names} share the partition key {paths[0].stem!r}; expected one file per key"


@dataclass(frozen=True)
class _Reference:
    """The layout every file must have: module name -> components C (in file order), and where it comes from."""

    components: dict[str, int]
    origin: str
    # Module order is part of a layout read from files; a declared layout names modules and sizes only
    # (a registered config keeps its keys sorted, so its order carries no meaning).
    ordered: bool
    has_safetensors: bool = False


def _declared_reference(layout: Mapping[str, int]) -> _Reference:
    return _Reference(dict(layout), "the layout declared in the config (source.layout)", ordered=False)


def _signature(layout: Layout) -> tuple[tuple[str, int], ...]:
    """What files must agree on: module names in order and their component counts (sample counts may differ)."""
    return tuple((name, shape[-1]) for name, shape in layout.items())


# (path, size, mtime) -> layout, or the error that made it unreadable: a process loading several members
# reads each header once.
_layout_cache: dict[tuple[str, int, int], Layout | BatchFileError] = {}


def _cached_layout(path: Path) -> Layout:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise BatchFileError(f"{path}: file no longer exists") from None
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _layout_cache:
        try:
            _layout_cache[key] = read_layout(path)
        except BatchFileError as error:
            _layout_cache[key] = error
    cached = _layout_cache[key]
    if isinstance(cached, BatchFileError):
        raise cached
    return cached


def _majority_reference(root: Path, path: Path) -> _Reference:
    """The layout shared by more readable files of `root` than any other."""
    voters: dict[tuple[tuple[str, int], ...], list[Path]] = {}
    for candidate in discover_batch_files(root).values():
        try:
            voters.setdefault(_signature(_cached_layout(candidate)), []).append(candidate)
        except BatchFileError:
            continue  # that file fails its own partition and has no say in the others'
    if not voters:
        # Nothing readable: `path` fails on its own problem when it is opened.
        return _Reference({}, "no readable file", ordered=False)
    ranked = sorted(voters.items(), key=lambda item: len(item[1]), reverse=True)
    signature, files = ranked[0]
    readable = sum(len(group) for group in voters.values())
    tied = [group for _, group in ranked if len(group) == len(files)]
    if len(tied) > 1:
        groups = "; ".join(", ".join(p.name for p in group) for group in tied)
        raise BatchFileError(
            f"{path}: the files of {root} do not agree on a module layout and none is shared by more files than "
            f"another (files alike: {groups}); declare the expected layout in the config as source.layout "
            "(module name -> number of components), so that the files that differ from it fail alone"
        )
    shown = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
    origin = (f"the layout most files of the directory share ({len(files)} of {readable} readable files: {shown})"
              if readable > 1 else f"{files[0].name}, the only readable file of the directory")
    return _Reference(dict(signature), origin, ordered=True,
                      has_safetensors=any(p.suffix == ".safetensors" for p in files))


@contextmanager
def _open_batch_file(path: Path) -> Iterator[tuple[dict[str, _TensorSpec], TensorGetter]]:
    """The file's tensor specs in file order, and a getter for their data, from one open handle."""
    openers = {".safetensors": _open_safetensors, ".npz": _open_npz, ".pt": _open_torch}
    opener = openers.get(path.suffix)
    if opener is None:
        expected = ", ".join(SUPPORTED_SUFFIXES)
        raise BatchFileError(f"{path}: unsupported file type {path.suffix!r}; expected one of {expected}")
    with ExitStack() as stack:
        with _reader_errors(path):
            specs, get_tensor = stack.enter_context(opener(path))

        def get_tensor_or_fail(name: str) -> torch.Tensor:
            with _reader_errors(path):
                return get_tensor(name)

        yield specs, get_tensor_or_fail


@contextmanager
def _reader_errors(path: Path) -> Iterator[None]:
    """Turn a reader library's failure on a bad file into a BatchFileError naming the file."""
    try:
        yield
    except (BatchFileError, MemoryError):
        raise
    except FileNotFoundError as error:
        raise BatchFileError(
            f"{path}: file no longer exists (deleted or renamed after the partitions were discovered?)"
        ) from error
    # Readers raise many types on corrupt input (SafetensorError, UnpicklingError, BadZipFile, zlib.error, ...).
    except Exception as error:
        raise BatchFileError(
            f"{path}: cannot be read ({_reader_reason(error)}); expected {_EXPECTED_CONTENT[path.suffix]}"
        ) from error


def _reader_reason(error: Exception) -> str:
    reason = str(error).strip()
    if isinstance(error, pickle.UnpicklingError):
        # torch's weights-only refusal wraps its reason in advice to unpickle arbitrary code, which we never do.
        _, marker, refusal = reason.partition("WeightsUnpickler error:")
        if marker:
            reason = refusal.strip().splitlines()[0].split(". ")[0]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


@contextmanager
def _open_safetensors(path: Path) -> Iterator[tuple[dict[str, _TensorSpec], TensorGetter]]:
    with safe_open(path, framework="pt", device="cpu") as handle:
        specs = {}
        for name in handle.keys():
            tensor_slice = handle.get_slice(name)
            dtype = tensor_slice.get_dtype()
            specs[name] = _TensorSpec(tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPE_NAMES.get(dtype, dtype))
        yield specs, handle.get_tensor


@contextmanager
def _open_npz(path: Path) -> Iterator[tuple[dict[str, _TensorSpec], TensorGetter]]:
    # Read as a zip of .npy members rather than via np.load, which takes a non-zip file for a
    # pickle or a single array and then fails with a misleading message.
    with zipfile.ZipFile(path) as archive:
        specs = {}
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                raise BatchFileError(
                    f"{path}: archive member {member.filename!r} is not a .npy array; "
                    f"expected {_EXPECTED_CONTENT['.npz']}"
                )
            with archive.open(member) as stream:
                shape, dtype = _npy_header(stream)
            specs[member.filename.removesuffix(".npy")] = _TensorSpec(shape, dtype.name)

        def get_tensor(name: str) -> torch.Tensor:
            with archive.open(f"{name}.npy") as stream:
                # allow_pickle=False: object arrays would run arbitrary code and are not activations anyway.
                return _numpy_to_torch(npy_format.read_array(stream, allow_pickle=False))

        yield specs, get_tensor


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(stream)
    # Format 3.0 only differs from 2.0 in allowing utf-8 field names, which float arrays never have.
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, _fortran_order, dtype = read_header(stream)
    return shape, dtype


def _numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    # torch only wraps arrays in native byte order.
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))


@contextmanager
def _open_torch(path: Path) -> Iterator[tuple[dict[str, _TensorSpec], TensorGetter]]:
    try:
        # Memory-mapped, a layout read touches the file's index, not its data (zip-format files, torch's default).
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        content = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    if not isinstance(content, Mapping):
        raise BatchFileError(f"{path}: contains a {type(content).__name__}; expected {_EXPECTED_CONTENT['.pt']}")
    specs = {}
    for name, value in content.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise BatchFileError(
                f"{path}: entry {name!r} -> {type(value).__name__}; expected {_EXPECTED_CONTENT['.pt']}"
            )
        specs[name] = _TensorSpec(tuple(value.shape), str(value.dtype).removeprefix("torch."))
    yield specs, content.__getitem__


def _validated_layout(path: Path, specs: dict[str, _TensorSpec]) -> Layout:
    if not specs:
        raise BatchFileError(f"{path}: contains no tensors; expected a mapping of module name -> tensor")
    problems = []
    for name, spec in specs.items():
        if spec.dtype not in FLOAT_DTYPES:
            problems.append(f"module {name!r} has dtype {spec.dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
        if len(spec.shape) not in SUPPORTED_NDIMS:
            problems.append(f"module {name!r} has shape {list(spec.shape)}, expected {EXPECTED_SHAPES}")
    # Every module must describe the same samples, or their columns cannot be concatenated.
    sample_shapes = {name: spec.shape[:-1] for name, spec in specs.items() if len(spec.shape) in SUPPORTED_NDIMS}
    if sample_shapes:
        first_name, first_samples = next(iter(sample_shapes.items()))
        for name, samples in sample_shapes.items():
            if samples != first_samples:
                problems.append(
                    f"module {name!r} has sample dimensions {list(samples)} but module {first_name!r} has "
                    f"{list(first_samples)}; expected all modules of a file to cover the same samples"
                )
    if problems:
        summary = f"is not a mapping of module name -> float {EXPECTED_SHAPES} tensor"
        raise BatchFileError(_problems_message(path, summary, problems))
    return {name: spec.shape for name, spec in specs.items()}


def _check_matches_reference(path: Path, layout: Layout, reference: _Reference) -> None:
    if not reference.components:
        return
    expected = reference.components
    problems = []
    missing = [name for name in expected if name not in layout]
    extra = [name for name in layout if name not in expected]
    if missing:
        problems.append(f"missing modules {missing}")
    if extra:
        problems.append(f"extra modules {extra}")
    for name, shape in layout.items():
        if name in expected and shape[-1] != expected[name]:
            problems.append(f"module {name!r} has C={shape[-1]} components, expected C={expected[name]}")
    shared_in_file_order = [name for name in layout if name in expected]
    shared_in_reference_order = [name for name in expected if name in layout]
    if reference.ordered and shared_in_file_order != shared_in_reference_order:
        order_problem = f"modules are in the order {shared_in_file_order}, expected {shared_in_reference_order}"
        if path.suffix == ".safetensors" or reference.has_safetensors:
            order_problem += " (.safetensors files list their modules in sorted name order)"
        problems.append(order_problem)
    if problems:
        raise BatchFileError(_problems_message(path, f"has a different module layout than {reference.origin}", problems))


def _value_problems(tensors: dict[str, torch.Tensor], value_range: tuple[float, float] | None) -> list[str]:
    problems = []
    for name, tensor in tensors.items():
        finite = torch.isfinite(tensor)
        finite_values = tensor
        if not bool(finite.all()):
            nan_count = int(torch.isnan(tensor).sum())
            inf_count = tensor.numel() - int(finite.sum()) - nan_count
            problems.append(f"module {name!r} has {nan_count} NaN and {inf_count} inf values (of {tensor.numel()})")
            finite_values = tensor[finite]
        if value_range is not None and finite_values.numel() > 0:
            low, high = (float(bound) for bound in torch.aminmax(finite_values))
            if low < value_range[0] or high > value_range[1]:
                problems.append(
                    f"module {name!r} has values from {low:g} to {high:g}, "
                    f"expected within [{value_range[0]:g}, {value_range[1]:g}]"
                )
    return problems


def _problems_message(path: Path, summary: str, problems: list[str]) -> str:
    return f"{path}: {summary}:\n" + "\n".join(f"  - {problem}" for problem in problems)


class FilesSource(ActivationSource[FilesSourceConfig]):
    """One activation file per member in a directory; the members are the files (named by their stems).

    Parameters
    ----------
    config : FilesSourceConfig
        `directory` of `.safetensors`, `.npz` or `.pt` files, each a mapping module name -> causal importances
        (`[batch, seq, C]` or `[samples, C]`); `value_range`, `layout` and `n_members` (the first n files).

    Raises
    ------
    BatchFileError
        From `check` (the directory) and `load_batch` (one file): naming the file, the problem and what was expected.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> from spd_assets.config.sources import FilesSourceConfig
    >>> from spd_assets.sources import FilesSource
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("batch_a", "batch_b"):
    ...     np.savez(directory / f"{name}.npz", **{"layers.0.mlp": np.random.default_rng(0).random((8, 5), dtype=np.float32)})
    >>> source = FilesSource(FilesSourceConfig(directory=directory))
    >>> source.member_keys()
    ['batch_a', 'batch_b']
    >>> tuple(source.load_batch("batch_a", seed=0)["layers.0.mlp"].shape)
    (8, 5)
    """

    kind = "files"
    config_type = FilesSourceConfig

    def member_keys(self) -> list[str]:
        directory = self.config.directory
        found = discover_batch_files(directory)
        # Dagster partition keys cannot contain these; say which file to rename rather than fail inside Dagster.
        unusable = {key: path.name for key, path in found.items() if set(key) & PARTITION_KEY_FORBIDDEN}
        if unusable:
            raise BatchFileError(
                f"{directory}: file names become partition keys, which cannot contain any of "
                f"{''.join(sorted(PARTITION_KEY_FORBIDDEN))}; rename {sorted(unusable.values())}"
            )
        keys = list(found)
        return keys[: self.config.n_members] if self.config.n_members is not None else keys

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        return load_batch(self.config.directory, member, value_range=self.config.value_range, layout=self.config.layout)
