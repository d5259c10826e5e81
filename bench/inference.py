"""End-to-end inference benchmark on a CT-sized case, and the network against PyTorch fp32.

Run from the repository root (bench/ is a namespace package):

    python -m bench.inference                # 512 x 512 x 200 at 0.8 x 0.8 x 2.0 mm, 2 threads
    python -m bench.inference --quick        # small case, one run: a CI smoke test (< 30 s)
    python -m bench.inference --help

The case is a synthetic abdominal CT (``phantom.make_phantom``, seed 200000: not a training case),
int16 HU, written to a temporary .nii.gz first, as a user would have it. On one machine and one
thread count it measures, with the timed runs interleaved round by round (the order rotating) so
that the machine's noise hits every method alike, the median of --repeats runs after one warm-up:

* **end to end**: each run in a fresh Python process (``python -m bench.inference --child``) doing
  what ``ternaryseg CT -o MASK`` does: ``pipeline.read_image``, ``load_model``, ``segment``,
  ``write_image_atomic``; time per stage (read, load model, preprocess, network, postprocess,
  write), their total, the process's wall time (interpreter start and imports included) and its
  peak RSS (``pipeline.peak_rss_bytes`` in the child at the end: VmHWM on Linux, everything the
  process ever held; not ``ru_maxrss``, which there inherits the forking parent's peak);
* **the network alone** on the preprocessed network input of the case (captured inside
  ``pipeline.segment``): the engine on its automatic CPU path, the engine forced to AVX2
  (``kernels.use_path('avx2')``), and a PyTorch fp32 execution of the same graph with the same
  dequantised weights (bench/torch_network.py) in NCDHW and in channels_last_3d memory format, with
  the same thread count (``torch.set_num_threads``); ratios against the faster torch layout, as a
  ratio of medians and as the median of per-round ratios;
* **exactness**: the engine's labels on that input equal the torch module's with the first layer
  summed in the engine's order (bench/torch_network.py), the AVX2 path's logits equal the automatic
  path's bit for bit; the labels of the plain ``F.conv3d`` module are compared too (reported: a
  first-layer value within one rounding of its threshold can flip a few labels). Exit status 1 if
  a required check fails;
* the model file's size against its fp32 size (``model_file.model_sizes``), and Dice of the mask
  against the phantom's truth.

Results go to --out (JSON; default bench/inference.json, or build/bench/inference_quick.json,
which git ignores, with --quick; its "summary" is also printed, on one line) and a Markdown table
beside it (same name, .md, also printed). torch is imported
only by this script (and bench/torch_network.py), never by TernarySegmentationLib; the child
processes do not import it.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED = 200_000
FULL = {"shape": (200, 512, 512), "spacing": (0.8, 0.8, 2.0), "repeats": 5}
QUICK = {"shape": (20, 128, 128), "spacing": (2.4, 2.4, 4.0), "repeats": 1}
TARGETS = {"network_vs_torch_fp32": 5.0, "network_avx2_vs_torch_fp32": 2.5, "end_to_end_s": 2.0,
           "peak_rss_mb": 1024.0, "model_fraction_of_fp32": 0.10}
PAUSE_S = 0.05  # between timed methods: lets spinning OpenMP workers of the previous one go idle


# ------------------------------------------------------------------------------------ one end-to-end run

def end_to_end(ct_path, model_path, mask_path, threads):
    """What ``ternaryseg CT -o MASK --model M --threads N`` does, timed per stage; run in a fresh
    process by ``--child``. Returns a dict (timings in s, peak RSS of this process in bytes)."""
    from TernarySegmentationLib import pipeline
    from TernarySegmentationLib.pipeline import peak_rss_bytes

    timings = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pipeline.InputWarning)
        image = pipeline.read_image(ct_path)
    timings["read"] = time.perf_counter() - start
    t = time.perf_counter()
    model = pipeline.load_model(model_path)
    timings["load model"] = time.perf_counter() - t
    result = pipeline.segment(image, model, threads=threads)
    timings.update(result.timings)
    t = time.perf_counter()
    pipeline.write_image_atomic(result.labels, mask_path, overwrite=True, classes=model.classes)
    timings["write"] = time.perf_counter() - t
    total = time.perf_counter() - start
    return {"timings_s": timings, "total_s": total, "peak_rss_bytes": peak_rss_bytes(),
            "region": list(result.region.size), "torch_imported": "torch" in sys.modules}


def _child_main(argv):
    ct, model, mask, threads = argv
    print(json.dumps(end_to_end(ct, model, mask, int(threads))))
    return 0


def run_child(ct_path, model_path, mask_path, threads):
    """One end-to-end run in a fresh interpreter; adds the process's wall time."""
    command = [sys.executable, "-m", "bench.inference", "--child", str(ct_path), str(model_path),
               str(mask_path), str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the end-to-end child failed ({done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------ the case

def make_case(folder, shape, spacing, seed):
    """Write the phantom CT to folder/ct.nii.gz; returns (path, truth label array)."""
    import SimpleITK as sitk

    from TernarySegmentationLib.phantom import make_phantom

    phantom = make_phantom(seed, shape=shape, spacing=spacing)
    image = phantom.to_sitk()[0]
    path = Path(folder) / "ct.nii.gz"
    sitk.WriteImage(image, str(path), True)
    return path, phantom.label


def network_input(ct_path, model, threads):
    """(the network's input for this CT, the engine's logits on it, pipeline Result), captured
    inside ``pipeline.segment``, so it is exactly what the pipeline feeds the network."""
    from TernarySegmentationLib import pipeline
    from TernarySegmentationLib.network import TernaryNetwork

    class Capture(TernaryNetwork):
        def forward(self, image, **kwargs):
            self.input = image
            self.logits = super().forward(image, **kwargs)
            return self.logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pipeline.InputWarning)
        image = pipeline.read_image(ct_path)
    capture = Capture(model)
    result = pipeline.segment(image, capture, threads=threads)
    return capture.input, capture.logits, result


# ------------------------------------------------------------------------------------ report

def _median(values):
    return statistics.median(values) if values else None


def _mb(value):
    return None if value is None else value / 2**20


def markdown_table(report):
    e2e, net, case, sizes = report["end_to_end"], report["network"], report["case"], report["model"]["sizes"]
    stages = e2e["stages_median_s"]
    targets = report["targets"]
    shape = " × ".join(map(str, case["shape_zyx"][::-1]))
    spacing = " × ".join(f"{s:g}" for s in case["spacing_mm"])
    lines = ["| measure | measured | target |", "|---|---:|---:|"]
    lines.append(f"| end to end, {shape} CT at {spacing} mm (read → write) | "
                 f"{e2e['total_median_s']:.2f} s | < {targets['end_to_end_s']:g} s |")
    lines.append("| — read / load model / preprocess / network / postprocess / write | "
                 + " / ".join(f"{stages[s]:.2f}" for s in ("read", "load model", "preprocess", "network",
                                                            "postprocess", "write")) + " s | |")
    lines.append(f"| — the whole `ternaryseg` process (Python start and imports included) | "
                 f"{e2e['process_wall_median_s']:.2f} s | |")
    lines.append(f"| peak memory (RSS) of that process | {e2e['peak_rss_max_mb']:.0f} MB | "
                 f"< {targets['peak_rss_mb']:.0f} MB |")
    torch_s = net["torch_fp32"]["median_s"]
    rows = (("engine", f"network: popcount ({net['engine']['path']})", "network_vs_torch_fp32"),
            ("engine_avx2", "network: popcount forced to AVX2", "network_avx2_vs_torch_fp32"))
    for key, label, target in rows:
        if net.get(key) is None:
            continue
        row = net[key]
        lines.append(f"| {label} vs PyTorch fp32 ({net['torch_fp32']['layout']}) | "
                     f"{row['median_s']:.2f} s vs {torch_s:.2f} s = **{row['ratio_torch_fp32']:.1f}×** "
                     f"({row['gmacs']:.0f} vs {net['torch_fp32']['gmacs']:.0f} GMAC/s) | "
                     f"≥ {targets[target]:g}× |")
    lines.append(f"| model file vs its fp32 equivalent | {sizes['file_bytes'] / 1e3:.0f} kB vs "
                 f"{sizes['fp32_bytes'] / 1e3:.0f} kB = {100 * report['model']['fraction_of_fp32']:.1f} % | "
                 f"≤ {100 * targets['model_fraction_of_fp32']:.0f} % |")
    exact = report["exactness"]
    lines.append(f"| labels: engine = PyTorch (first layer in the engine's order) | "
                 f"{'identical' if exact['labels_equal_torch_engine_order'] else 'DIFFERENT'} | identical |")
    lines.append("")
    machine = report["machine"]
    load = report["load_average_before"]
    voxels = " × ".join(map(str, net["input_shape_zyx"][::-1]))
    lines.append(f"{report['settings']['threads']} thread(s) on {machine['cpu_model']} "
                 f"({machine['os_cpu_count']} CPUs); median of {report['settings']['repeats']} run(s) after "
                 f"a warm-up, interleaved; network input {voxels} voxels at the model's "
                 f"{' × '.join(f'{s:g}' for s in report['model']['spacing_mm'])} mm "
                 f"({net['gmac']:.0f} GMAC); Dice against the phantom's truth {report['dice']:.3f}"
                 + (f"; 1-min load average before the run {load[0]:.2f}." if load else "."))
    return "\n".join(lines)


def text_summary(report):
    e2e, net = report["end_to_end"], report["network"]
    lines = [f"end to end (median of {len(e2e['runs'])}): {e2e['total_median_s']:.2f} s in-process, "
             f"{e2e['process_wall_median_s']:.2f} s process wall, peak RSS {e2e['peak_rss_max_mb']:.0f} MB"]
    for stage, seconds in e2e["stages_median_s"].items():
        lines.append(f"  {stage:<12s} {seconds:7.3f} s")
    lines.append(f"network alone on {net['input_shape_zyx']} ({net['gmac']:.1f} GMAC):")
    for key in ("engine", "engine_avx2"):
        row = net.get(key)
        if row:
            name = f"{key} ({row['path']})"
            lines.append(f"  {name:<26s} {row['median_s']:7.3f} s  {row['gmacs']:6.1f} GMAC/s  "
                         f"x{row['ratio_torch_fp32']:.2f} torch fp32 "
                         f"(paired x{row['ratio_torch_fp32_paired']:.2f})")
    nodes = net["engine"]["nodes_median_s"]
    lines.append("  engine per node (ms): " + ", ".join(f"{node} {1e3 * t:.0f}" for node, t in nodes.items()))
    for layout, row in net["torch"].items():
        lines.append(f"  {'torch fp32 ' + layout:<26s} {row['median_s']:7.3f} s  {row['gmacs']:6.1f} GMAC/s")
    exact = report["exactness"]
    lines.append("exactness: " + "; ".join(f"{k}: {v}" for k, v in exact.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference",
        description="End-to-end inference on a CT-sized synthetic case (time per stage, peak RSS) and "
                    "the network against PyTorch fp32 on the same input and thread count.")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per method after one warm-up, median reported (default "
                             f"{FULL['repeats']}; {QUICK['repeats']} with --quick)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="CT array shape (default 200 512 512)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="CT spacing in mm (default 0.8 0.8 2.0)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"phantom case (default {SEED})")
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: a small case (20 x 128 x 128 at 2.4 x 2.4 x 4 mm), one run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result file (default bench/inference.json; with --quick "
                             "build/bench/inference_quick.json); the Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.shape = tuple(args.shape or preset["shape"])
    args.spacing = tuple(args.spacing or preset["spacing"])
    args.repeats = preset["repeats"] if args.repeats is None else args.repeats
    if args.out is None:
        args.out = REPO / ("build/bench/inference_quick.json" if args.quick else "bench/inference.json")
    if args.threads < 1 or args.repeats < 1 or min(args.shape) < 2 or min(args.spacing) <= 0:
        parser.error("--threads, --repeats must be >= 1, --shape sizes >= 2 and --spacing > 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"note: the machine is busy (1-min load average {load_before[0]:.2f} before the run); "
              "timings will be noisy", flush=True)

    import torch

    from kernels.bench import _cpuinfo, _git_commit
    from TernarySegmentationLib import kernels, pipeline
    from TernarySegmentationLib.demo import dice
    from TernarySegmentationLib.model_file import model_sizes
    from TernarySegmentationLib.network import TernaryNetwork

    from .torch_network import TorchNetwork, torch_logits

    torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else pipeline.default_model_path()
    model = pipeline.load_model(model_path)
    cpu = _cpuinfo()
    paths = kernels.available_paths()
    print(f"CPU {cpu.get('model')} ({os.cpu_count()} cpus); torch {torch.__version__}; kernel paths {paths} "
          f"(auto: {kernels.current_path()}); threads {args.threads}; model {model_path}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ternaryseg-bench-") as folder:
        t = time.perf_counter()
        ct_path, truth = make_case(folder, args.shape, args.spacing, args.seed)
        print(f"case: phantom seed {args.seed}, {' x '.join(map(str, args.shape[::-1]))} voxels at "
              f"{' x '.join(f'{s:g}' for s in args.spacing)} mm, {ct_path.stat().st_size / 2**20:.1f} MB "
              f".nii.gz (made in {time.perf_counter() - t:.1f} s)", flush=True)
        mask_path = Path(folder) / "mask.nii.gz"

        # Warm-up and checks: the network input as the pipeline builds it, the engine's logits.
        x, logits, result = network_input(ct_path, model, args.threads)
        labels_engine = logits.argmax(-1)
        case_dice = dice(pipeline.sitk.GetArrayViewFromImage(result.labels) > 0, truth > 0)
        del result, truth
        engine = TernaryNetwork(model)
        macs = sum(engine.macs(x.shape[:3]).values())
        exactness = {}
        with torch.inference_mode():
            exact_logits = torch_logits(TorchNetwork(model, exact_first_layer=True), x)
        exactness["labels_equal_torch_engine_order"] = bool(
            np.array_equal(exact_logits.argmax(-1), labels_engine))
        exactness["logits_max_abs_diff_torch_engine_order"] = float(np.abs(exact_logits - logits).max())
        del exact_logits

        node_times = []  # per timed engine run: node -> seconds, from the progress callback

        def engine_profiled():
            stamps = [("start", time.perf_counter())]
            out = engine.forward(x, threads=args.threads,
                                 progress=lambda fraction, node: stamps.append((node, time.perf_counter())))
            node_times.append({node: t - stamps[i][1] for i, (node, t) in enumerate(stamps[1:])})
            return out

        methods = {"engine": engine_profiled}
        if "avx2" in paths:
            def engine_avx2():
                with kernels.use_path("avx2"):
                    return engine.forward(x, threads=args.threads)
            methods["engine_avx2"] = engine_avx2
        torch_modules = {"ncdhw": TorchNetwork(model),
                         "channels_last": TorchNetwork(model, channels_last=True)}
        for layout, module in torch_modules.items():
            methods[f"torch {layout}"] = lambda module=module: torch_logits(module, x)

        for name, run in methods.items():  # warm-up, with checks on the outputs
            out = run()
            if name == "engine_avx2":
                exactness["avx2_logits_identical_to_auto"] = bool(np.array_equal(out, logits))
            elif name.startswith("torch"):
                exactness[f"{name.replace(' ', '_')}_label_mismatches"] = int(
                    np.count_nonzero(out.argmax(-1) != labels_engine))
            del out
        warm = run_child(ct_path, model_path, mask_path, args.threads) if not args.quick else None
        print("warm-up done; exactness: " + ", ".join(f"{k} {v}" for k, v in exactness.items()), flush=True)

        methods["end to end"] = lambda: run_child(ct_path, model_path, mask_path, args.threads)
        times = {name: [] for name in methods}
        children = []
        names = list(methods)
        gc.collect()
        gc.disable()
        try:
            for r in range(args.repeats):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    time.sleep(PAUSE_S)
                    start = time.perf_counter()
                    out = methods[name]()
                    times[name].append(time.perf_counter() - start)
                    if name == "end to end":
                        children.append(out)
                    del out
                print(f"round {r + 1}/{args.repeats}: "
                      + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
        finally:
            gc.enable()
        nii_bytes = ct_path.stat().st_size

    # ---- aggregate
    torch_rows = {}
    for layout in torch_modules:
        runs = times[f"torch {layout}"]
        torch_rows[layout] = {"median_s": _median(runs), "times_s": runs, "gmacs": macs / _median(runs) / 1e9}
    best = min(torch_rows, key=lambda layout: torch_rows[layout]["median_s"])
    network = {"input_shape_zyx": list(x.shape[:3]), "gmac": macs / 1e9,
               "torch": torch_rows, "torch_fp32": {"layout": best, **torch_rows[best]}}
    for key in ("engine", "engine_avx2"):
        if key not in times:
            network[key] = None
            continue
        median = _median(times[key])
        network[key] = {
            "path": kernels.current_path() if key == "engine" else "avx2",
            "median_s": median, "times_s": times[key], "gmacs": macs / median / 1e9,
            "ratio_torch_fp32": torch_rows[best]["median_s"] / median,
            "ratio_torch_fp32_paired": statistics.median(
                t / e for t, e in zip(times[f"torch {best}"], times[key]))}
    profile = {node: _median([run[node] for run in node_times[1:]]) for node in node_times[0]}
    network["engine"]["nodes_median_s"] = profile  # the warm-up run (packing the weights) left out
    stages = list(children[0]["timings_s"])
    e2e = {"runs": children, "warm_up_run": warm,
           "stages_median_s": {s: _median([c["timings_s"][s] for c in children]) for s in stages},
           "total_median_s": _median([c["total_s"] for c in children]),
           "process_wall_median_s": _median([c["process_wall_s"] for c in children]),
           "peak_rss_median_mb": _mb(_median([c["peak_rss_bytes"] for c in children])),
           "peak_rss_max_mb": _mb(max(c["peak_rss_bytes"] for c in children)),
           "region_zyx": children[0]["region"][::-1],
           "child_imported_torch": any(c["torch_imported"] for c in children)}
    sizes = model_sizes(model)
    fraction = sizes["file_bytes"] / sizes["fp32_bytes"]
    required = [exactness["labels_equal_torch_engine_order"],
                exactness.get("avx2_logits_identical_to_auto", True), not e2e["child_imported_torch"]]
    targets_met = {
        "network_vs_torch_fp32": network["engine"]["ratio_torch_fp32"] >= TARGETS["network_vs_torch_fp32"],
        "network_avx2_vs_torch_fp32": (
            None if network["engine_avx2"] is None
            else network["engine_avx2"]["ratio_torch_fp32"] >= TARGETS["network_avx2_vs_torch_fp32"]),
        "end_to_end_s": e2e["total_median_s"] < TARGETS["end_to_end_s"],
        "peak_rss_mb": e2e["peak_rss_max_mb"] < TARGETS["peak_rss_mb"],
        "model_fraction_of_fp32": fraction <= TARGETS["model_fraction_of_fp32"]}
    summary = {
        "end_to_end_s": e2e["total_median_s"], "process_wall_s": e2e["process_wall_median_s"],
        "stages_s": e2e["stages_median_s"], "peak_rss_mb": e2e["peak_rss_max_mb"],
        "network_s": {key: (network[key] or {}).get("median_s") for key in ("engine", "engine_avx2")}
        | {"torch_fp32": network["torch_fp32"]["median_s"]},
        "network_vs_torch_fp32": network["engine"]["ratio_torch_fp32"],
        "network_avx2_vs_torch_fp32": (network["engine_avx2"] or {}).get("ratio_torch_fp32"),
        "model_fraction_of_fp32": fraction,
        "labels_identical_to_torch": exactness["labels_equal_torch_engine_order"],
        "threads": args.threads, "load_average_before": load_before}
    report = {
        "summary": summary,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.inference"] + argv),
        "settings": {"threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                     "statistic": "median of timed runs after one warm-up, interleaved (order rotating)"},
        "machine": {"cpu_model": cpu.get("model"), "cpu_flags": cpu.get("flags"),
                    "os_cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch.__version__,
                    "torch_num_threads": torch.get_num_threads(), "kernel_paths_available": paths,
                    "kernels_library": kernels.LIBRARY_PATH, "git_commit": _git_commit()},
        "case": {"seed": args.seed, "shape_zyx": list(args.shape), "spacing_mm": list(args.spacing),
                 "nii_gz_bytes": nii_bytes,
                 "content": "TernarySegmentationLib.phantom.make_phantom, int16 HU"},
        "model": {"path": str(model_path), "name": model.metadata.get("name"), "sha256": model.sha256,
                  "spacing_mm": list(model.preprocessing["model_spacing_mm"]), "sizes": sizes,
                  "fraction_of_fp32": fraction},
        "end_to_end": e2e,
        "network": network,
        "torch_fp32": "bench/torch_network.py TorchNetwork: F.conv3d for every convolution, ternary steps on "
                      "the file's thresholds, max_pool3d ceil, nearest upsampling, cat, 1x1x1 classifier; "
                      "under inference_mode, torch.set_num_threads(threads)",
        "exactness": exactness,
        "dice": case_dice,
        "targets": TARGETS,
        "targets_met": targets_met,
        "checks_passed": all(required),
        "elapsed_s": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print()
    print(text_summary(report))
    print()
    print(json.dumps(summary))
    md = markdown_table(report)
    print()
    print(md)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print()
    print(f"checks {'passed' if report['checks_passed'] else 'FAILED'}; targets met: "
          + ", ".join(f"{k} {v}" for k, v in targets_met.items()))
    print(f"wrote {out} and {out.with_suffix('.md')}; total {report['elapsed_s']:.1f} s")
    return 0 if report["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
