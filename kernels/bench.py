"""Benchmark of the ternary popcount convolution against PyTorch fp32 and int8 convolutions on the CPU.

Run from the repository root (kernels/ is a namespace package):

    python -m kernels.bench                 # 96^3 voxels, 16/32/64 channels, 2 threads
    python -m kernels.bench --quick         # tiny smoke run (CI), a few seconds
    python -m kernels.bench --help

For each layer (size^3 output voxels, C -> C channels, 3x3x3, stride 1, zero 'same' padding) it times,
in one process, on the same thread count, with the measurements interleaved round by round so that the
machine's noise hits all methods alike:

* every available kernel path of ``TernarySegmentationLib.kernels`` (``portable`` only with
  --include-portable or --quick), epilogue 'ternary' with int32 thresholds (packed map in and out);
* ``torch.nn.functional.conv3d`` fp32, padding=1;
* ``torch.ao.nn.quantized.Conv3d`` int8 (quantized engine 'x86', per-channel qint8 weights,
  quint8 input from ``torch.quantize_per_tensor(x, scale, 0, torch.quint8)``).

PyTorch is timed with its input in NCDHW and in channels_last_3d memory format (both are legal and
the fastest differs by op and channel count); the table compares against the faster of the two, so
the ratios are conservative. Each method is warmed up once, then timed --repeats times
(time.perf_counter); the median is reported. The warm-up outputs are used to check that all our paths
return bit-identical packed maps and that they equal thresholding torch's fp32 convolution of the
same ternary data (integer sums, exact in fp32). The exit status is 1 when a check fails.

Reported per layer and path: GMAC/s (MACs = out voxels * Cout * Cin * 27), torch fp32 and int8 GMAC/s,
the ratios ours/theirs, and the fraction of the popcount limit R * cores_used * GHz, where R = 170
ternary MACs per cycle per core is the theoretical AVX-512 VPOPCNTDQ throughput (docs: shared NOTES,
"What the CPU can do"). The clock is measured with a dependent integer add chain (one add per cycle)
compiled with the system C compiler and run on cores_used cores at once; without a compiler it is
read from /proc/cpuinfo 'cpu MHz' (max over cores; under a hypervisor this is often the nominal TSC
rate, not the boost clock), and without that a documented 3.49 GHz is used. --ghz overrides all.

Results go to --out (JSON; default bench/kernels.json, or build/bench/kernels_quick.json, which git
ignores, with --quick) and a Markdown table beside it (same name, .md). torch is imported only
here, never by TernarySegmentationLib.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
R_POPCOUNT = 170  # ternary MACs / cycle / core, AVX-512 VPOPCNTDQ theory (NOTES "What the CPU can do")
R_NOTE = ("theoretical ternary MACs per cycle per core of an AVX-512 VPOPCNTDQ popcount kernel "
          "(2 popcounts + logic per 64 MACs, 512-bit registers); ~122 was reached by a register-blocked "
          "micro-kernel on L1-resident data (NOTES, 'What the CPU can do')")
DOCUMENTED_GHZ = 3.49
DEFAULTS = {"size": 96, "channels": [16, 32, 64], "repeats": 5}
QUICK = {"size": 16, "channels": [8, 16], "repeats": 3}
SEED = 20240613

_CLOCK_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <time.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
int main(void) {
    double best = 0.0;
    for (int r = 0; r < 300; r++) { /* short trials, best of many: robust to time-sharing */
        uint64_t x = 0;
        const long n = 500000; /* 8 dependent adds per iteration: 4e6 cycles, ~1 ms */
        double t0 = now();
        for (long i = 0; i < n; i++)
            __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                             "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
        double ghz = 8.0 * n / (now() - t0) / 1e9;
        if (ghz > best) best = ghz;
    }
    printf("%.4f\n", best);
    return 0;
}
"""


# ------------------------------------------------------------------------------------ machine

def _cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)]
    wanted = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq")
    return {"model": model.group(1).strip() if model else None,
            "flags": [f for f in wanted if flags and f in flags.group(1).split()],
            "mhz_max": max(mhz) if mhz else None}


def _measure_ghz(cores):
    """Clock of `cores` cores busy at once, from a dependent add chain; None when impossible."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, "not x86-64"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = os.path.join(tmp, "clock.c"), os.path.join(tmp, "clock")
            Path(src).write_text(_CLOCK_C)
            subprocess.run([cc, "-O2", src, "-o", exe], check=True, capture_output=True, timeout=60)
            procs = [subprocess.Popen([exe], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
            values = [float(p.communicate(timeout=60)[0]) for p in procs]
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return None, f"measurement failed: {error}"
    ghz = statistics.median(values)
    if not 0.5 < ghz < 7.0:
        return None, f"implausible measurement {values}"
    return ghz, values


def clock(cores, override):
    info = {"cpuinfo_mhz_max": _cpuinfo().get("mhz_max"), "measured_ghz_per_core": None}
    if override:
        info.update(ghz=override, clock_source="--ghz on the command line")
        return info
    ghz, detail = _measure_ghz(cores)
    if ghz is not None:
        info.update(ghz=ghz, measured_ghz_per_core=detail, clock_source=(
            f"measured: dependent integer add chain (1 add/cycle), {cores} core(s) busy at once, "
            "best of 300 ~1 ms trials per core, median over cores"))
        return info
    mhz = info["cpuinfo_mhz_max"]
    if mhz and 500 < mhz < 7000:
        info.update(ghz=mhz / 1000, clock_source=(
            f"/proc/cpuinfo 'cpu MHz', max over cores (clock measurement unavailable: {detail}); "
            "in a VM this may be the nominal rate, not the boost clock"))
        return info
    info.update(ghz=DOCUMENTED_GHZ, clock_source=(
        f"documented {DOCUMENTED_GHZ} GHz of the project machine (NOTES); measurement unavailable "
        f"({detail}) and /proc/cpuinfo has no usable 'cpu MHz'"))
    return info


def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------ one layer

class Method:
    def __init__(self, name, kind, run, setup=None):
        self.name, self.kind, self.run, self.setup = name, kind, run, setup or (lambda: None)
        self.times = []


def _quantized_conv(torch, weight, channels):
    conv = torch.ao.nn.quantized.Conv3d(channels, channels, 3, padding=1)
    qw = torch.quantize_per_channel(weight, torch.ones(channels, dtype=torch.double),
                                    torch.zeros(channels, dtype=torch.long), 0, torch.qint8)
    conv.set_weight_bias(qw, None)
    conv.scale, conv.zero_point = 1.0, 0
    return conv


def bench_layer(K, torch, size, channels, paths, threads, repeats, layouts, rng):
    F = torch.nn.functional
    shape = (size, size, size)
    # Inputs: a random ternary map (about 62 % nonzero) and random ternary weights (2/3 nonzero).
    x = rng.standard_normal(shape + (channels,), dtype=np.float32)
    half = np.full(channels, 0.5, np.float32)
    xm = K.pack(x, -half, half, threads=threads)
    del x
    x8 = K.unpack(xm, threads=threads)  # (D, H, W, C) int8
    w8 = rng.integers(-1, 2, size=(channels, channels, 3, 3, 3), dtype=np.int8)
    pw = K.pack_weights(w8)
    p_x, p_w = np.count_nonzero(x8) / x8.size, np.count_nonzero(w8) / w8.size
    sigma = float(np.sqrt(27 * channels * p_x * p_w))  # std of the accumulator
    hi = (np.ceil(0.5 * sigma) + rng.integers(-1, 2, channels)).astype(np.int32)
    lo = (-hi).astype(np.int32)

    methods = []
    for path in paths:
        methods.append(Method(path, "ours", lambda: K.ternary_conv3d(
            xm, pw, epilogue="ternary", lo=lo, hi=hi, threads=threads),
            setup=lambda path=path: K.set_path(path)))

    x_cl = torch.from_numpy(x8).permute(3, 0, 1, 2).unsqueeze(0)  # NCDHW view of (D, H, W, C)
    w_t = torch.from_numpy(w8).float()
    scale = 1.0 / 64
    for layout in layouts:
        fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
        xf = x_cl.float().contiguous(memory_format=fmt)
        wf = w_t.contiguous(memory_format=fmt)
        qx = torch.quantize_per_tensor(xf, scale, 0, torch.quint8)
        qconv = _quantized_conv(torch, w_t, channels)

        def fp32(xf=xf, wf=wf):
            with torch.inference_mode():
                return F.conv3d(xf, wf, padding=1)

        methods.append(Method(f"torch fp32 {layout}", "fp32", fp32))
        methods.append(Method(f"torch int8 {layout}", "int8", lambda qconv=qconv, qx=qx: qconv(qx)))

    # Warm-up, which also gives the outputs to verify (our paths come first in `methods`).
    checks = {}
    reference = ours = None
    hi_t, lo_t = (torch.from_numpy(v).view(1, channels, 1, 1, 1) for v in (hi, lo))
    for m in methods:
        m.setup()
        out = m.run()
        if m.kind == "ours":
            if reference is None:
                reference, reference_name = out, m.name
                ours = torch.from_numpy(K.unpack(out, threads=threads))  # (D, H, W, C) int8
            else:
                checks[f"{m.name} == {reference_name}"] = bool(np.array_equal(out.data, reference.data))
        elif m.kind == "fp32" and ours is not None:
            # Sums of +-1 terms are exact in fp32, so thresholding torch's output must give our map.
            tern = (out > hi_t).to(torch.int8) - (out < lo_t).to(torch.int8)
            checks[f"threshold({m.name}) == {reference_name}"] = bool(
                torch.equal(tern[0].permute(1, 2, 3, 0), ours))
            del tern
        del out
    K.set_path("auto")
    del reference, ours
    gc.collect()

    # Timed rounds, interleaved; the order rotates each round.
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(methods)
            for m in methods[k:] + methods[:k]:
                m.setup()
                time.sleep(0.02)  # let spinning OpenMP workers of the previous method go idle
                t0 = time.perf_counter()
                out = m.run()
                m.times.append(time.perf_counter() - t0)
                del out
    finally:
        gc.enable()
        K.set_path("auto")
    return methods, checks, {"p_nonzero_input": p_x, "p_nonzero_weights": p_w,
                             "threshold_hi_mean": float(hi.mean())}


# ------------------------------------------------------------------------------------ report

def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(results, threads, clock_info, limit):
    lines = ["| layer | path | GMAC/s | torch fp32 | torch int8 | ×fp32 | ×int8 | % popcount limit |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for layer in results:
        for row in layer["paths"]:
            lines.append(f"| {layer['layer']} | {row['path']} | {row['gmacs']:.1f} | "
                         f"{layer['torch_fp32']['gmacs']:.1f} | {layer['torch_int8']['gmacs']:.1f} | "
                         f"{row['ratio_fp32']:.2f} | {row['ratio_int8']:.2f} | "
                         f"{100 * row['fraction_of_limit']:.1f} |")
    lines.append("")
    lines.append(f"{threads} thread(s); median of the timed runs; torch columns: the faster of NCDHW and "
                 f"channels_last_3d input; popcount limit = R {R_POPCOUNT} ternary MACs/cycle/core × "
                 f"{limit['cores_used']} core(s) × {clock_info['ghz']:.2f} GHz = "
                 f"{limit['gmacs']:.0f} GMAC/s "
                 f"(clock: {clock_info['clock_source'].split(':')[0]}).")
    return "\n".join(lines)


def text_table(results):
    head = (f"{'layer':<22} {'method':<26} {'ms':>9} {'GMAC/s':>8} {'x fp32':>7} {'x int8':>7} "
            f"{'% limit':>8}")
    lines = [head, "-" * len(head)]
    for layer in results:
        for row in layer["paths"]:
            lines.append(f"{layer['layer']:<22} {row['path']:<26} {1e3 * row['median_s']:>9.2f} "
                         f"{row['gmacs']:>8.1f} {row['ratio_fp32']:>7.2f} {row['ratio_int8']:>7.2f} "
                         f"{100 * row['fraction_of_limit']:>8.1f}")
        for name, t in layer["torch"].items():
            lines.append(f"{layer['layer']:<22} {name:<26} {1e3 * t['median_s']:>9.2f} {t['gmacs']:>8.1f}")
        status = "all identical" if all(layer["checks"].values()) else "MISMATCH"
        detail = "; ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in layer["checks"].items())
        lines.append(f"{'':<22} check: {status} ({detail})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Time the ternary popcount conv3d paths against torch fp32 and int8 conv3d "
                    "(3x3x3, stride 1, C -> C channels, size^3 voxels), on the same thread count.")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"output voxels per axis (default {DEFAULTS['size']}; "
                             f"{QUICK['size']} with --quick)")
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help="channel counts C of the C -> C layers (default "
                             f"{' '.join(map(str, DEFAULTS['channels']))})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per method, median reported (default {DEFAULTS['repeats']})")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke run: size {QUICK['size']}, channels "
                             f"{' '.join(map(str, QUICK['channels']))}, "
                             f"{QUICK['repeats']} repeats, portable path included")
    parser.add_argument("--include-portable", action="store_true",
                        help="also time the (slow) portable C path")
    parser.add_argument("--torch-layout", choices=("both", "ncdhw", "channels_last"), default="both",
                        help="torch input memory format(s) to time; the faster one is compared "
                             "(default both)")
    parser.add_argument("--ghz", type=float, default=None,
                        help="core clock for the popcount limit (skips detection)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result file (default bench/kernels.json; with --quick "
                             "build/bench/kernels_quick.json, which git ignores); the Markdown table goes "
                             "beside it with suffix .md")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key in ("size", "channels", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.out is None:
        args.out = REPO / ("build/bench/kernels_quick.json" if args.quick else "bench/kernels.json")
    if args.threads < 1 or args.size < 1 or args.repeats < 1 or min(args.channels) < 1:
        parser.error("--threads, --size, --repeats and --channels must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"note: the machine is busy (1-min load average {load_before[0]:.2f} before the run); "
              "timings will be noisy", flush=True)
    warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*are deprecated and will be removed.*")
    import torch

    from TernarySegmentationLib import kernels as K

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    cores_used = min(args.threads, os.cpu_count() or 1)
    clock_info = clock(cores_used, args.ghz)
    limit_gmacs = R_POPCOUNT * cores_used * clock_info["ghz"]
    limit = {"R_macs_per_cycle_per_core": R_POPCOUNT, "R_meaning": R_NOTE, "cores_used": cores_used,
             "ghz": clock_info["ghz"], "gmacs": limit_gmacs}
    available = K.available_paths()
    paths = [p for p in available if p != "portable" or args.include_portable or args.quick]
    layouts = ["ncdhw", "channels_last"] if args.torch_layout == "both" else [args.torch_layout]
    cpu = _cpuinfo()
    print(f"CPU {cpu.get('model')} ({os.cpu_count()} cpus, flags {' '.join(cpu.get('flags', []))}); "
          f"torch {torch.__version__}; kernel paths {available}, timing {paths}; threads {args.threads}")
    print(f"clock {clock_info['ghz']:.3f} GHz ({clock_info['clock_source']}); /proc/cpuinfo says "
          f"{clock_info['cpuinfo_mhz_max']} MHz; popcount limit {R_POPCOUNT} x {cores_used} x "
          f"{clock_info['ghz']:.2f} = {limit_gmacs:.0f} GMAC/s")

    rng = np.random.default_rng(SEED)
    results = []
    ok = True
    for channels in args.channels:
        name = f"{args.size}^3 {channels}->{channels} 3x3x3"
        print(f"... {name}", flush=True)
        macs = args.size ** 3 * channels * channels * 27
        methods, checks, data_info = bench_layer(K, torch, args.size, channels, paths, args.threads,
                                                 args.repeats, layouts, rng)
        ok &= all(checks.values())
        stats = {m.name: {"median_s": statistics.median(m.times), "min_s": min(m.times), "times_s": m.times,
                          "gmacs": macs / statistics.median(m.times) / 1e9} for m in methods}
        torch_stats = {m.name: stats[m.name] for m in methods if m.kind != "ours"}
        best = {}
        for kind in ("fp32", "int8"):
            name_best = max((m.name for m in methods if m.kind == kind), key=lambda n: stats[n]["gmacs"])
            best[kind] = {"method": name_best, **stats[name_best]}
        rows = []
        for m in methods:
            if m.kind != "ours":
                continue
            g = stats[m.name]["gmacs"]
            # Also the median of per-round ratios (same round = same machine state), robust to noise
            # that comes and goes during a layer.
            paired = {f"ratio_{kind}_paired": statistics.median(
                t / o for t, o in zip(best[kind]["times_s"], m.times)) for kind in ("fp32", "int8")}
            rows.append({"path": m.name, **stats[m.name], "ratio_fp32": g / best["fp32"]["gmacs"],
                         "ratio_int8": g / best["int8"]["gmacs"], **paired,
                         "fraction_of_limit": g / limit_gmacs})
        results.append({"layer": name, "size": args.size, "in_channels": channels, "out_channels": channels,
                        "kernel": [3, 3, 3], "stride": 1, "epilogue": "ternary", "macs": macs,
                        "paths": rows, "torch": torch_stats, "torch_fp32": best["fp32"],
                        "torch_int8": best["int8"], "checks": checks,
                        "outputs_identical": all(checks.values()), "data": data_info})

    print()
    print(text_table(results))
    md = markdown_table(results, args.threads, clock_info, limit)
    print()
    print(md)
    elapsed = time.perf_counter() - start

    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "kernels.bench"] + sys.argv[1:]),
        "settings": {"threads": args.threads, "size": args.size, "channels": args.channels,
                     "repeats": args.repeats, "quick": args.quick, "torch_layouts": layouts,
                     "statistic": "median of timed runs after one warm-up, interleaved across methods"},
        "machine": {"cpu_model": cpu.get("model"), "cpu_flags": cpu.get("flags"),
                    "os_cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch.__version__,
                    "torch_num_threads": torch.get_num_threads(),
                    "torch_quantized_engine": torch.backends.quantized.engine,
                    "kernel_paths_available": available, "kernel_paths_timed": paths,
                    "kernels_library": K.LIBRARY_PATH, "git_commit": _git_commit()},
        "clock": clock_info,
        "popcount_limit": limit,
        "torch_int8": "torch.ao.nn.quantized.Conv3d, engine x86, weights quantize_per_channel qint8 "
                      "(scale 1, zp 0), no bias, input quantize_per_tensor(x, 1/64, 0, quint8)",
        "torch_fp32": "torch.nn.functional.conv3d(x, w, padding=1) under inference_mode",
        "layers": results,
        "all_outputs_identical": ok,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print()
    verdict = "identical, and equal to thresholded torch fp32" if ok else "MISMATCH (see checks)"
    print(f"outputs of {', '.join(paths)}: {verdict}")
    print(f"wrote {out} and {out.with_suffix('.md')}; total {elapsed:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
