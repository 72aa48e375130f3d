"""The torch source on all-MiniLM-L6-v2: throughput against a bare forward pass, and peak memory of a large member.

    python benchmarks/bench_sources.py                      # both measurements, each in a process of its own
    python benchmarks/bench_sources.py --mode ratio --tokens 16384
    python benchmarks/bench_sources.py --mode memory --tokens 200000

ratio: one member's activations end to end (hooked, chunked forward pass in inference mode, then
`activations_from_chunks`: statistics and the matrix the merge takes), against a bare forward pass
of the model over the same chunks. The two alternate chunk by chunk in one process (bare before
hooked on even chunks, after on odd ones), so a machine loaded by others slows both alike; the load
average is printed. Target: overhead <= 1.5x.

memory: peak resident memory for `--tokens` tokens x all six MLP layers (9,216 components) at
activation threshold 0.1, through `activations_from_chunks` as the `component_activations` asset
runs it: each chunk straight into the compact form (only the entries above the threshold, as a
sparse CSR). Target: model + compact output + 1 GiB at most. Also prints what the dense float32
matrix would take (never allocated with a threshold).

The corpus is the docstrings of the Python standard library (about 220k MiniLM tokens), written
to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spd_assets.sources import TorchSource, TorchSourceConfig  # noqa: E402
from spd_assets.sources.streaming import activations_from_chunks  # noqa: E402
from spd_assets.sources.torch_model import model_inputs  # noqa: E402
from spd_math import MergeConfig  # noqa: E402
from tests.model_helpers import MINILM_MODULES, docstrings, minilm_directory  # noqa: E402

SEQ_LEN = 64
THRESHOLD = 0.1
MIB = 2**20
# Modules whose import prints, opens windows or needs hardware: not part of the corpus.
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "pydoc_data", "lib2to3",
                   "ensurepip", "venv", "test", "xxlimited", "xxlimited_35", "xxsubtype"}


def write_stdlib_corpus(folder: Path) -> Path:
    for name in sorted(sys.stdlib_module_names - SKIPPED_MODULES):
        if name.startswith("_"):
            continue
        try:
            text = docstrings(name)
        except Exception:  # modules that do not import on this platform
            continue
        if text:
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def load_source(tokens: int, chunk: int, corpus: Path) -> TorchSource:
    source = TorchSource(TorchSourceConfig(
        model=str(minilm_directory()), modules=(MINILM_MODULES,), text=corpus, seq_len=SEQ_LEN,
        batch_size=tokens // SEQ_LEN, n_members=1, chunk_size=chunk, memory_budget_gb=64))
    source.check()
    return source


def bare_forward(model, ids: np.ndarray) -> None:
    with torch.inference_mode():
        args, kwargs = model_inputs(model, torch.as_tensor(ids, dtype=torch.long))
        model(*args, **kwargs)


def measure_ratio(source: TorchSource, chunk: int) -> dict:
    batch = source.token_batch("member_000", seed=0)
    model = source.loaded.model
    bare_seconds = 0.0

    def with_bare_forwards(chunks):
        """The hooked chunks as they come, with a bare forward pass of the same sequences beside each."""
        nonlocal bare_seconds
        for index in range(0, batch.n_sequences, chunk):
            ids = batch.inputs[index : index + chunk]
            if index // chunk % 2 == 0:
                started = time.perf_counter()
                bare_forward(model, ids)
                bare_seconds += time.perf_counter() - started
                yield next(chunks)
            else:
                hooked = next(chunks)
                started = time.perf_counter()
                bare_forward(model, ids)
                bare_seconds += time.perf_counter() - started
                yield hooked

    bare_forward(model, batch.inputs[:chunk])  # warm-up
    started = time.perf_counter()
    streamed = activations_from_chunks(
        with_bare_forwards(source.activation_chunks(batch, torch.device("cpu"))), module_widths=source.module_widths(),
        activation_dims=batch.sample_dims, merge_config=MergeConfig(activation_threshold=THRESHOLD),
        seq_mode="concat", memory_budget_bytes=source.memory_budget_bytes)
    end_to_end = time.perf_counter() - started - bare_seconds
    tokens = batch.n_tokens
    return {
        "mode": "ratio", "tokens": tokens, "components": streamed.processed.n_components + len(streamed.processed.dead_labels),
        "chunk_sequences": chunk, "bare_tokens_per_s": round(tokens / bare_seconds),
        "end_to_end_tokens_per_s": round(tokens / end_to_end), "overhead_x": round(end_to_end / bare_seconds, 3),
    }


def measure_memory(source: TorchSource) -> dict:
    batch = source.token_batch("member_000", seed=0)
    widths = source.module_widths()
    components = sum(widths.values())
    model = source.loaded.model
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    bare_forward(model, batch.inputs[:2])  # warm-up, so the baseline includes the model's working set
    before = status_mib("VmRSS")
    started = time.perf_counter()
    streamed = activations_from_chunks(  # the path the component_activations asset takes
        source.activation_chunks(batch, torch.device("cpu")), module_widths=widths, activation_dims=batch.sample_dims,
        merge_config=MergeConfig(activation_threshold=THRESHOLD, filter_dead_threshold=0.0), seq_mode="concat",
        memory_budget_bytes=64 * 2**30)
    seconds = time.perf_counter() - started
    peak = status_mib("VmHWM")
    csr = streamed.processed.activations
    output = sum(part.numel() * part.element_size() for part in (csr.crow_indices(), csr.col_indices(), csr.values())) / MIB
    density = csr.values().numel() / (batch.n_tokens * components)
    return {
        "mode": "memory", "tokens": batch.n_tokens, "components": components, "threshold": THRESHOLD,
        "seconds": round(seconds, 1), "tokens_per_s": round(batch.n_tokens / seconds),
        "density_above_threshold": round(density, 4), "compact_output_mib": round(output, 1),
        "dense_float32_would_be_mib": round(batch.n_tokens * components * 4 / MIB),
        "model_parameters_mib": round(model_mib), "rss_before_mib": round(before), "peak_rss_mib": round(peak),
        "peak_above_model_and_output_mib": round(peak - before - output),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["all", "ratio", "memory"], default="all")
    parser.add_argument("--tokens", type=int, help="tokens per member (default: 16384 for ratio, 200000 for memory)")
    parser.add_argument("--chunk", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--corpus", type=Path, help="a folder of .txt files (default: the stdlib's docstrings)")
    args = parser.parse_args()
    if args.mode == "all":
        for mode in ("ratio", "memory"):  # each in a process of its own, so the peak memory is that mode's
            subprocess.run([sys.executable, __file__, "--mode", mode, "--chunk", str(args.chunk),
                            "--threads", str(args.threads),
                            *(["--tokens", str(args.tokens)] if args.tokens else []),
                            *(["--corpus", str(args.corpus)] if args.corpus else [])], check=True)
        return
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (16_384 if args.mode == "ratio" else 200_000)
    with tempfile.TemporaryDirectory() as folder:
        corpus = args.corpus or write_stdlib_corpus(Path(folder))
        load_before = os.getloadavg()[0]
        source = load_source(tokens, args.chunk, corpus)
        result = measure_ratio(source, args.chunk) if args.mode == "ratio" else measure_memory(source)
    result.update(threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  load_average_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
