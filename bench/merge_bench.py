"""Benchmark ``mergeguard merge`` against ``mergekit-pytorch`` and check that they agree.

The benchmark builds a randomly initialised open_clip ViT-B-32 image tower (fp32, ~88M
parameters), saves it as ``base.safetensors`` and writes N perturbed copies
``ft1..ftN.safetensors`` (base + 0.01 * per-tensor-std Gaussian noise, one seed per copy).
It then runs, each as its own subprocess:

* ``mergeguard merge BASE FT1..FTN -o OUT --method ties --lam 0.3 --density 0.2
  --normalize sum --trim-scope tensor --quiet``
* ``mergeguard merge BASE FT1..FTN -o OUT --method task_arithmetic --lam 0.3 --quiet``
* ``mergekit-pytorch`` with the equivalent YAML configs (ties: normalize false, lambda 0.3,
  weight 1, density 0.2; task_arithmetic: normalize false, lambda 0.3, weight 1), on CPU, in
  fp32, writing safetensors.

For every run it records wall time and the child's peak RSS (``ru_maxrss`` from
``os.wait4``), then compares the two outputs tensor by tensor:

* task_arithmetic: elementwise ``|a - b| <= 1e-6 * max(1, |b|)`` (fp32 rounding only);
* ties: ``||a - b|| / ||b|| <= 1e-4`` per tensor.

A rich table with times, peak RSS, mergekit/mergeguard ratios and the agreement verdict is
printed; the exit status is non-zero if any run fails or any output pair disagrees.

Usage::

    python bench/merge_bench.py [--workdir DIR] [--keep] [--inputs 6]
        [--only {both,mergeguard,mergekit}] [--methods ties,task_arithmetic]
        [--mergekit-bin PATH] [--mergeguard-cmd "python -m mergeguard"]
        [--reuse-inputs] [--repeat N]

mergekit is expected in its own virtual environment (see ``--mergekit-bin``)::

    python3 -m venv .bench-venv/mergekit
    .bench-venv/mergekit/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MERGEKIT_BIN = REPO_ROOT / ".bench-venv" / "mergekit" / "bin" / "mergekit-pytorch"
METHODS = ("ties", "task_arithmetic")
TOOLS = ("mergeguard", "mergekit")

LAMBDA = 0.3
DENSITY = 0.2
NOISE_SCALE = 0.01
TA_RTOL = 1e-6  # task_arithmetic: |a - b| <= TA_RTOL * max(1, |b|), elementwise
TIES_RTOL = 1e-4  # ties: ||a - b|| / ||b|| <= TIES_RTOL, per tensor

console = Console(width=None if sys.stdout.isatty() else 120)


# --------------------------------------------------------------------------- inputs


def build_inputs(workdir: Path, n_inputs: int, reuse: bool) -> tuple[Path, list[Path]]:
    """Write base.safetensors and ft1..ftN.safetensors into ``workdir``."""
    base_path = workdir / "base.safetensors"
    ft_paths = [workdir / f"ft{i}.safetensors" for i in range(1, n_inputs + 1)]
    if reuse and base_path.exists() and all(p.exists() for p in ft_paths):
        console.print(f"[dim]reusing inputs in {workdir}[/dim]")
        return base_path, ft_paths

    import open_clip  # imported lazily: only needed to build the inputs

    torch.manual_seed(0)
    t0 = time.perf_counter()
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.float()
    state = {k: v.detach().contiguous().clone() for k, v in visual.state_dict().items()}
    del visual
    gc.collect()
    n_params = sum(t.numel() for t in state.values())
    save_file(state, str(base_path))

    for i, path in enumerate(ft_paths, start=1):
        gen = torch.Generator().manual_seed(1000 + i)
        perturbed: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                perturbed[name] = tensor
                continue
            perturbed[name] = (tensor + _noise_scale(tensor) * _randn(tensor, gen)).contiguous()
        save_file(perturbed, str(path))
        del perturbed
    del state
    gc.collect()
    console.print(
        f"built ViT-B-32 visual ({n_params / 1e6:.1f}M params, {len(ft_paths)} fine-tunes) "
        f"in {time.perf_counter() - t0:.1f}s -> {workdir}"
    )
    return base_path, ft_paths


def _noise_scale(tensor: torch.Tensor) -> float:
    """0.01 * std of the tensor; falls back to 0.01 * mean|x| (or 0.01) for constant tensors."""
    if tensor.numel() > 1:
        std = float(tensor.float().std())
        if math.isfinite(std) and std > 0:
            return NOISE_SCALE * std
    mean_abs = float(tensor.float().abs().mean()) if tensor.numel() else 0.0
    return NOISE_SCALE * (mean_abs if mean_abs > 0 else 1.0)


def _randn(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)


# --------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    tool: str
    method: str
    out_dir: Path
    wall_s: float = math.nan
    peak_rss_kib: int = 0
    returncode: int = 0
    log_path: Path | None = None
    walls: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024.0


def run_measured(cmd: Sequence[str], log_path: Path) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, peak RSS KiB of that child, exit code)."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    return wall, int(rusage.ru_maxrss), proc.returncode


def mergeguard_cmd(prefix: Sequence[str], method: str, base: Path, fts: Sequence[Path], out: Path) -> list[str]:
    cmd = [*prefix, "merge", str(base), *map(str, fts), "-o", str(out), "--method", method]
    cmd += ["--lam", str(LAMBDA)]
    if method == "ties":
        cmd += ["--density", str(DENSITY), "--normalize", "sum", "--trim-scope", "tensor"]
    cmd.append("--quiet")
    return cmd


def mergekit_config(method: str, base: Path, fts: Sequence[Path]) -> str:
    """YAML for mergekit-pytorch (JSON string literals are valid YAML scalars)."""
    params = {"weight": 1.0}
    if method == "ties":
        params["density"] = DENSITY
    lines = [
        f"merge_method: {method}",
        f"base_model: {json.dumps(str(base))}",
        "dtype: float32",
        "out_dtype: float32",
        "parameters:",
        "  normalize: false",
        f"  lambda: {LAMBDA}",
        "models:",
    ]
    for ft in fts:
        lines.append(f"  - model: {json.dumps(str(ft))}")
        lines.append("    parameters:")
        lines += [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


MERGEKIT_FLAGS = (
    "--device", "cpu",
    "--no-cuda",
    "--no-read-to-gpu",
    "--no-low-cpu-memory",
    "--no-lazy-unpickle",
    "--safe-serialization",
    "--no-async-write",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--quiet",
)  # fmt: skip


def mergekit_cmd(bin_path: Path, config: Path, out: Path) -> list[str]:
    return [str(bin_path), str(config), str(out), *MERGEKIT_FLAGS]


def run_tool(
    tool: str,
    method: str,
    workdir: Path,
    base: Path,
    fts: Sequence[Path],
    args: argparse.Namespace,
) -> RunResult:
    out_dir = workdir / f"out-{tool}-{method}"
    log_path = workdir / f"log-{tool}-{method}.txt"
    if tool == "mergeguard":
        cmd = mergeguard_cmd(shlex.split(args.mergeguard_cmd), method, base, fts, out_dir)
    else:
        config = workdir / f"mergekit-{method}.yaml"
        config.write_text(mergekit_config(method, base, fts))
        cmd = mergekit_cmd(args.mergekit_bin, config, out_dir)

    result = RunResult(tool=tool, method=method, out_dir=out_dir, log_path=log_path)
    console.print(f"[bold]{tool} {method}[/bold]: [dim]{shlex.join(cmd)}[/dim]")
    for _ in range(args.repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        warm([base, *fts])  # both tools read the inputs from the page cache: the first one no longer pays the disk
        wall, rss, rc = run_measured(cmd, log_path)
        result.walls.append(wall)
        result.peak_rss_kib = max(result.peak_rss_kib, rss)
        result.returncode = rc
        if rc != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            console.print(f"[red]{tool} {method} exited {rc}[/red]; log tail:\n{tail}")
            break
    result.wall_s = min(result.walls)
    console.print(f"  wall {result.wall_s:.2f}s  peak RSS {result.peak_rss_mib:.0f} MiB")
    return result


def warm(paths: Sequence[Path]) -> None:
    """Read each file once, so it is in the page cache when a tool is timed (a tool run first on files written
    or read long ago paid for the disk: 13.5 s against 7.8 s warm, 2026-12-08)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


# --------------------------------------------------------------------------- outputs


def safetensors_files(out: Path) -> list[Path]:
    """Locate the safetensors file(s) of a merge output (single file, folder or shards)."""
    if out.is_file():
        return [out]
    if not out.is_dir():
        raise FileNotFoundError(out)
    indexes = sorted(out.glob("*.safetensors.index.json"))
    if indexes:
        weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]
        return [out / name for name in sorted(set(weight_map.values()))]
    single = out / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors output under {out}")
    return files


class TensorReader:
    """Lazy name -> tensor access over one or more safetensors files."""

    def __init__(self, out: Path, stack: ExitStack) -> None:
        self.handles: dict[str, object] = {}
        for path in safetensors_files(out):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():
                self.handles[key] = handle

    def keys(self) -> set[str]:
        return set(self.handles)

    def get(self, key: str) -> torch.Tensor:
        return self.handles[key].get_tensor(key)  # type: ignore[attr-defined]


def _rel(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


@dataclass
class Agreement:
    agree: bool
    worst_tensor: str = ""
    worst_value: float = 0.0
    worst_delta_rel: float = 0.0
    message: str = ""


def compare_outputs(method: str, mg_out: Path, mk_out: Path, base: Path) -> Agreement:
    """Compare mergeguard (a) against mergekit (b) tensor by tensor."""
    with ExitStack() as stack:
        a_reader = TensorReader(mg_out, stack)
        b_reader = TensorReader(mk_out, stack)
        base_reader = TensorReader(base, stack)
        a_keys, b_keys = a_reader.keys(), b_reader.keys()
        if a_keys != b_keys:
            missing = sorted(b_keys - a_keys)[:5]
            extra = sorted(a_keys - b_keys)[:5]
            return Agreement(False, message=f"key mismatch: missing={missing} extra={extra}")

        worst = Agreement(True)
        worst.worst_value = -1.0
        for key in sorted(b_keys):
            a, b = a_reader.get(key), b_reader.get(key)
            if a.shape != b.shape or a.dtype != b.dtype:
                return Agreement(
                    False,
                    worst_tensor=key,
                    message=f"{key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}",
                )
            a64, b64 = a.double(), b.double()
            diff = a64 - b64
            d_norm = float(diff.norm())
            if method == "task_arithmetic":
                value = float((diff.abs() / b64.abs().clamp_min(1.0)).max()) if b.numel() else 0.0
                tol = TA_RTOL
            else:
                value = _rel(d_norm, float(b64.norm()))
                tol = TIES_RTOL
            if not math.isfinite(value):
                value = math.inf  # NaN/inf always disagrees and ranks worst
            ok = value <= tol
            # informative only: error relative to the merged task vector (b - base)
            delta_rel = _rel(d_norm, float((b64 - base_reader.get(key).double()).norm()))
            if value > worst.worst_value:
                worst.worst_tensor, worst.worst_value = key, value
                worst.worst_delta_rel = delta_rel
            if not ok:
                worst.agree = False
        metric = "max|a-b|/max(1,|b|)" if method == "task_arithmetic" else "||a-b||/||b||"
        tol = TA_RTOL if method == "task_arithmetic" else TIES_RTOL
        worst.message = (
            f"worst {metric} = {worst.worst_value:.3e} (tol {tol:.0e}) at {worst.worst_tensor}; "
            f"||a-b||/||b-base|| there = {worst.worst_delta_rel:.3e}"
        )
        return worst


# --------------------------------------------------------------------------- report


def _fmt_ratio(num: float, den: float) -> str:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def report(results: dict[tuple[str, str], RunResult], agreements: dict[str, Agreement]) -> None:
    table = Table(title="mergeguard vs mergekit (ViT-B-32 visual, fp32, CPU)")
    table.add_column("method", no_wrap=True)
    table.add_column("tool", no_wrap=True)
    table.add_column("wall s", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    table.add_column("time mk/mg", justify="right")
    table.add_column("RSS mk/mg", justify="right")
    table.add_column("outputs agree")
    for method in METHODS:
        for tool in TOOLS:
            res = results.get((tool, method))
            if res is None:
                continue
            time_ratio = rss_ratio = agree = ""
            if tool == "mergekit" and ("mergeguard", method) in results:
                mg = results[("mergeguard", method)]
                time_ratio = _fmt_ratio(res.wall_s, mg.wall_s)
                rss_ratio = _fmt_ratio(res.peak_rss_kib, mg.peak_rss_kib)
                if method in agreements:
                    agree = "[green]yes[/green]" if agreements[method].agree else "[red]NO[/red]"
            table.add_row(
                method,
                tool,
                f"{res.wall_s:.2f}" if res.ok else "[red]failed[/red]",
                f"{res.peak_rss_mib:.0f}",
                time_ratio,
                rss_ratio,
                agree,
            )
    console.print(table)
    for method, agreement in agreements.items():
        style = "green" if agreement.agree else "red"
        console.print(f"[{style}]{method}[/{style}]: {agreement.message}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="work dir (default: a fresh tempdir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument("--inputs", type=int, default=6, help="number of fine-tuned copies")
    parser.add_argument("--only", choices=("both", "mergeguard", "mergekit"), default="both", help="tools to run")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument("--mergekit-bin", type=Path, default=DEFAULT_MERGEKIT_BIN)
    parser.add_argument(
        "--mergeguard-cmd",
        default=f"{shlex.quote(sys.executable)} -m mergeguard",
        help="command prefix that runs the mergeguard CLI (default: this python -m mergeguard)",
    )
    parser.add_argument(
        "--reuse-inputs",
        action="store_true",
        help="reuse base/ft*.safetensors already present in --workdir",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool/method (min wall, max RSS reported)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {sorted(unknown)}")
    if args.inputs < 1 or args.repeat < 1:
        parser.error("--inputs and --repeat must be >= 1")
    if args.only in ("both", "mergekit") and not args.mergekit_bin.exists():
        parser.error(f"mergekit-pytorch not found at {args.mergekit_bin} (see --mergekit-bin)")
    return args


def _iter_runs(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    tools = TOOLS if args.only == "both" else (args.only,)
    for method in args.methods:
        for tool in tools:
            yield tool, method


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    created_tmp = args.workdir is None
    if created_tmp:
        workdir = Path(tempfile.mkdtemp(prefix="merge-bench-", dir="/tmp"))
    else:
        workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        base, fts = build_inputs(workdir, args.inputs, args.reuse_inputs)
        results: dict[tuple[str, str], RunResult] = {}
        for tool, method in _iter_runs(args):
            results[(tool, method)] = run_tool(tool, method, workdir, base, fts, args)

        agreements: dict[str, Agreement] = {}
        if args.only == "both":
            for method in args.methods:
                mg, mk = results[("mergeguard", method)], results[("mergekit", method)]
                if mg.ok and mk.ok:
                    agreements[method] = compare_outputs(method, mg.out_dir, mk.out_dir, base)
                else:
                    agreements[method] = Agreement(False, message="a run failed; not compared")

        report(results, agreements)
        failed = not all(r.ok for r in results.values())
        disagree = not all(a.agree for a in agreements.values())
        return 1 if failed or disagree else 0
    finally:
        if args.keep or not created_tmp:
            console.print(f"[dim]work dir kept: {workdir}[/dim]")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
