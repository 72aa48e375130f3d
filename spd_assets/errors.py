"""Every error spd-cluster raises for something a user can fix, with one common base.

Each message names what was wrong (the file, field or value) and what was expected, so the
command line prints it as it is, without a traceback. Errors of the math itself derive from
`spd_math.SpdMathError` instead; both are `ValueError`s where bad input is the cause.
"""

from __future__ import annotations


class SpdClusterError(Exception):
    """Base of spd-cluster's user-facing errors."""


class ExperimentConfigError(SpdClusterError, ValueError):
    """The experiment config is invalid; the message lists every field at fault."""


class SourceError(SpdClusterError, ValueError):
    """An activation source cannot give a member's batch: missing model, empty text, bad file, ..."""


class BatchFileError(SourceError):
    """A batch file or its directory is missing, unreadable or holds the wrong content.

    The message names the file (or directory), what was wrong and what was expected.
    """


class StorageError(SpdClusterError, RuntimeError):
    """A stored result is missing or unreadable; the message names the file."""


class UnknownExperimentError(StorageError):
    """An experiment's name that no config in the results folder has (misspelt, or never run there)."""


class DiskFullError(StorageError):
    """A result could not be written: its filesystem is full. The message names the filesystem, the file, and
    what can be freed; nothing half-written is left and earlier results are untouched."""


class DatabaseError(SpdClusterError, RuntimeError):
    """The results database cannot be opened or prepared; the message says why and what to do."""


class DeploymentError(SpdClusterError, ValueError):
    """The deployment settings are invalid; the message names the setting and the source."""


class InstanceUnreachableError(SpdClusterError, RuntimeError):
    """The Dagster instance's database (PostgreSQL) did not answer; the message says where and what to do."""


class DeviceError(SpdClusterError, RuntimeError):
    """A device specification is invalid or no device could be leased; the message says which and why."""


class MemoryFitError(SpdClusterError, ValueError):
    """A member (or as many as asked for at once) would not fit in the memory available; nothing was started."""


class UsageError(SpdClusterError, ValueError):
    """A command-line argument is out of range for the stored results; the message names the argument."""


class HistoryFormatError(StorageError, ValueError):
    """Not a valid merge history zip, or not writable as one; the message names the file and the problem."""


class ExperimentChangedError(SpdClusterError, ValueError):
    """An experiment is registered with another config or other members and has results; the message says what
    changed and how to proceed."""


class NoMembersError(SpdClusterError, RuntimeError):
    """No member of an ensemble has a merge history to build it from."""


class ConsensusError(SpdClusterError, ValueError):
    """The consensus iteration cannot be chosen as configured; the message says why and what to set."""


class ContextsError(SpdClusterError, ValueError):
    """A member's activations do not match its token batch, so its contexts cannot be told."""


class PipelineError(SpdClusterError, RuntimeError):
    """The ensemble could not be materialized; the message gives the first failure."""


class QueryRefused(SpdClusterError, ValueError):
    """A query over the results tried what queries may not do (write, read other files, reach the network, load
    extensions, attach databases, change settings); the message says what a query may do."""


class BatchProcessingError(SpdClusterError, RuntimeError):
    """Batches failed in a `BatchProcessor` run; the message names each failed batch and its error.

    `completed` maps each batch that did finish (its path, as given) to its merge history.
    """

    def __init__(self, message: str, completed: dict | None = None) -> None:
        super().__init__(message)
        self.completed = completed or {}


class ExportError(SpdClusterError, ValueError):
    """Results cannot be written in the original pipeline's or the SPD app's format; the message says what is
    missing or out of range and what was expected."""


class HistoryFileError(SourceError):
    """A history file of the `histories` source is missing, in neither original format, or does not belong with
    the other histories; the message names the file and the problem."""


class SlurmError(SpdClusterError, RuntimeError):
    """A SLURM command failed (not found, rejected the submission) or a step's SLURM job did not complete."""
