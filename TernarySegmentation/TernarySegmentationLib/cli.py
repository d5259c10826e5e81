"""The ``ternaryseg`` command line.

``ternaryseg CT -o MASK`` (or ``ternaryseg segment CT -o MASK``) segments the pancreas in a CT file
(NIfTI, NRRD, MHA) or a DICOM series folder and writes the mask (NIfTI, NRRD, MHA or a Slicer
``.seg.nrrd``) on the exact grid of the CT, through ``pipeline`` (the code path of the Slicer module
too). Bad input ends with one line ``ternaryseg: error: ...`` and a non-zero exit code, never a
traceback; an existing output is replaced only with ``--overwrite``.

``ternaryseg demo [--out DIR]`` makes a synthetic abdominal CT (a phantom on a clinical 0.8 x 0.8 x
2 mm grid), segments it with the shipped model through the same pipeline, and writes the CT, the
mask and a PNG of three slices with the contours; it prints Dice against the phantom's truth, the
time per stage and the peak memory (``demo``). ``ternaryseg demo --kernels`` instead runs a small
ternary 3D encoder-decoder with random weights through the popcount kernels on every CPU path,
checks each path bit for bit against the numpy reference and prints the speed.
``ternaryseg info`` prints the kernels library, the CPU paths and threads.
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np

COMMANDS = ("segment", "info", "demo")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _info(args):
    from . import __version__, kernels

    print(f"TernarySegmentation {__version__}")
    print(f"kernels library : {kernels.LIBRARY_PATH}")
    print(f"CPU paths       : {', '.join(kernels.available_paths())} (selected: {kernels.current_path()})")
    print(f"threads         : {kernels.max_threads()}")
    return 0


def _demo_network(rng, channels):
    """Weights and thresholds of a small U-shaped ternary network (random, for the demo)."""
    def layer(cin, cout):
        w = rng.choice(np.array([-1, 0, 1], np.int8), size=(cout, cin, 3, 3, 3), p=[0.3, 0.4, 0.3])
        # thresholds near +-sqrt(fan-in)/2 keep about a third of the outputs nonzero
        t = int(np.sqrt(cin * 27 * 0.6) * 0.5)
        return w, np.full(cout, -t, np.int32), np.full(cout, t, np.int32)
    c = channels
    return {"enc1": layer(c, c), "enc2": layer(c, 2 * c), "mid": layer(2 * c, 2 * c),
            "dec": layer(3 * c, c), "out": layer(c, c)}


def _run_network(ops, first, net, packed, x, threads):
    """first-layer float conv -> enc1 -> pool -> enc2 -> mid -> up -> concat -> dec -> out."""
    w0, b0, lo0, hi0 = first
    h0 = ops.float_conv3d(x, w0, b0, lo=lo0, hi=hi0, threads=threads)

    def conv(name, m):
        _, lo, hi = net[name]
        return ops.ternary_conv3d(m, packed[name], lo=lo, hi=hi, threads=threads)

    h1 = conv("enc1", h0)
    h2 = conv("mid", conv("enc2", ops.max_pool(h1, threads=threads)))
    up = ops.upsample(h2, h1.shape, threads=threads)
    h3 = conv("dec", ops.concat(h1, up, threads=threads))
    return conv("out", h3)


def _demo_kernels(args):
    from . import kernels, reference

    rng = np.random.default_rng(args.seed)
    c, size = args.channels, args.size
    net = _demo_network(rng, c)
    first = (rng.normal(0, 1, (c, 1, 3, 3, 3)).astype(np.float32), np.zeros(c, np.float32),
             np.full(c, -2.0, np.float32), np.full(c, 2.0, np.float32))
    packed = {name: kernels.pack_weights(w) for name, (w, _, _) in net.items()}
    ref_packed = {name: w for name, (w, _, _) in net.items()}
    volume = rng.normal(0, 1, (size, size, size, 1)).astype(np.float32)
    crop = np.ascontiguousarray(volume[:12, :13, :14])
    expected = _run_network(reference, first, net, ref_packed, crop, None)
    macs = _network_macs(size, c)
    print(f"Ternary U-net demo: {size}^3 voxels, {c} base channels, {macs / 1e9:.2f} GMAC, "
          f"{args.threads or kernels.max_threads()} threads")
    for path in kernels.available_paths():
        with kernels.use_path(path):
            same = _run_network(kernels, first, net, packed, crop, args.threads) == expected
            _run_network(kernels, first, net, packed, volume, args.threads)  # warm-up
            start = time.perf_counter()
            _run_network(kernels, first, net, packed, volume, args.threads)
            seconds = time.perf_counter() - start
        print(f"  {path:9s} {seconds * 1e3:8.1f} ms  {macs / seconds / 1e9:7.1f} GMAC/s  "
              f"{'bit-identical to the numpy reference' if same else 'MISMATCH with the reference'}")
        if not same:
            return 1
    return 0


def _demo(args):
    from . import demo

    bars = []

    def progress(fraction, stage):  # the bar starts (and its clock runs) when segmenting starts
        if not bars:
            bars.append(ProgressBar(sys.stdout))
        bars[0](fraction, stage)

    try:
        result = demo.run_demo(args.out, model=args.model, threads=args.threads, seed=args.seed,
                               shape=tuple(args.phantom_shape or demo.DEMO_SHAPE),
                               spacing=tuple(args.phantom_spacing or demo.DEMO_SPACING),
                               overwrite=args.overwrite, progress=progress, log=print)
    finally:
        for bar in bars:
            bar.close()
    for message in result.warnings:
        print(f"ternaryseg: warning: {message}", file=sys.stderr)
    paths = result.paths
    print(f"model: {result.model_name}")
    print("time per stage:")
    for stage, seconds in result.timings.items():
        note = {"make phantom": "  (demo only)", "write CT": "  (demo only)", "figure": "  (demo only)"}
        print(f"  {stage:<13s} {seconds:7.2f} s{note.get(stage, '')}")
    print(f"  {'segmenting':<13s} {result.segment_seconds:7.2f} s  (read .. write, as "
          "`ternaryseg CT -o MASK`)")
    print(f"  {'total':<13s} {result.total_seconds:7.2f} s")
    peak = "unknown" if result.peak_rss_bytes is None else f"{result.peak_rss_bytes / 2**20:.0f} MB"
    scope = "while segmenting" if result.peak_rss_scope == "segmenting" else "of the process"
    print(f"peak memory (RSS) {scope}: {peak}")
    print(f"Dice against the phantom's truth: {result.dice:.3f} (network {result.network_ml:.1f} ml, "
          f"truth {result.truth_ml:.1f} ml)")
    print(f"wrote {paths['ct']}, {paths['mask']}, {paths['png']}")
    print(f"  {paths['png'].name}: axial, coronal and sagittal slices through the pancreas, window "
          f"[{demo.WINDOW_HU[0]:g}, {demo.WINDOW_HU[1]:g}] HU; orange: the network, blue: the truth")
    return 0


def _network_macs(size, c):
    full, half = size ** 3, ((size + 1) // 2) ** 3
    return 27 * (full * c * 1 + full * c * c + half * c * 2 * c + half * 4 * c * c
                 + full * 3 * c * c + full * c * c)


class ProgressBar:
    """``progress(fraction, stage)`` as a bar on a stream: redrawn in place on a terminal, appended to
    (no carriage returns) in a log file."""

    def __init__(self, stream, width=30, label="segmenting"):
        self.stream, self.width, self.label = stream, width, label
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.drawn = -1
        self.start = time.perf_counter()

    def __call__(self, fraction, stage):
        filled = int(round(max(0.0, min(1.0, fraction)) * self.width))
        if self.tty:
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%} {stage[:20]:<20}")
        else:
            if self.drawn < 0:
                self.stream.write(f"{self.label} [")
                self.drawn = 0
            self.stream.write("#" * max(0, filled - self.drawn))
        self.drawn = max(self.drawn, filled)
        self.stream.flush()

    def close(self):
        if self.drawn >= 0 or self.tty:
            seconds = time.perf_counter() - self.start
            self.stream.write(f" {seconds:.1f} s\n" if self.tty else
                              "#" * (self.width - self.drawn) + f"] {seconds:.1f} s\n")
            self.stream.flush()


def _peak_rss_text():
    from .pipeline import peak_rss_bytes

    peak = peak_rss_bytes()
    return "unknown" if peak is None else f"{peak / 2**20:.0f} MB"


def _segment(args):
    from . import pipeline

    def say(text):
        if not args.quiet:
            print(text, file=sys.stderr)

    started = time.perf_counter()
    timings = {}
    outputs = [args.output] + ([args.probabilities] if args.probabilities else [])
    for path in outputs:
        pipeline.check_output_path(path, overwrite=args.overwrite)  # fail before any work
    if args.probabilities:
        if pipeline.output_suffix(args.probabilities) == ".seg.nrrd":
            raise pipeline.InputError(f"{args.probabilities}: a probability map is not a segmentation; "
                                      "write it as .nii.gz, .nii, .nrrd or .mha")
        if os.path.abspath(args.probabilities) == os.path.abspath(args.output):
            raise pipeline.InputError("--probabilities and -o name the same file")
    for path in outputs:
        if os.path.exists(args.ct) and os.path.exists(path) and os.path.samefile(args.ct, path):
            raise pipeline.InputError(f"{path} is the input CT; choose another output name")

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pipeline.InputWarning)
        image = pipeline.read_image(args.ct, series=args.series)
    timings["read"] = time.perf_counter() - start
    shown = set()
    for warning in caught:
        message = str(warning.message)
        print(f"ternaryseg: warning: {message}", file=sys.stderr)
        shown.add(message.split(": ", 1)[-1])
    start = time.perf_counter()
    model = pipeline.load_model(args.model)
    timings["load model"] = time.perf_counter() - start
    if args.verbose:
        say(f"CT     : {args.ct}: size {image.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())} mm, {image.GetPixelIDTypeAsString()}")
        say(f"model  : {model.metadata['name']} ({model.file_size} bytes), spacing "
            f"{model.preprocessing['model_spacing_mm']} mm, HU window {model.preprocessing['hu_window']}")

    bar = None if args.quiet else ProgressBar(sys.stderr)
    try:
        result = pipeline.segment(image, model, threads=args.threads, progress=bar,
                                  largest_component=args.largest_component,
                                  probabilities=bool(args.probabilities))
    finally:
        if bar is not None:
            bar.close()
    timings.update(result.timings)
    for message in result.warnings:
        if message not in shown:
            print(f"ternaryseg: warning: {message}", file=sys.stderr)

    start = time.perf_counter()
    pipeline.write_image_atomic(result.labels, args.output, overwrite=args.overwrite, classes=model.classes)
    if args.probabilities:
        pipeline.write_image_atomic(result.probability, args.probabilities, overwrite=args.overwrite)
    timings["write"] = time.perf_counter() - start
    total = time.perf_counter() - started

    voxels = int(np.count_nonzero(pipeline.sitk.GetArrayViewFromImage(result.labels)))
    millilitres = voxels * float(np.prod(image.GetSpacing())) / 1000
    if args.verbose:
        say(f"region : {result.region.size} voxels of the model grid, origin "
            f"{tuple(round(o, 2) for o in result.region.origin)} mm")
        for stage, seconds in timings.items():
            say(f"  {stage:<12s} {seconds:7.2f} s")
        say(f"  {'total':<12s} {total:7.2f} s, peak memory (RSS) {_peak_rss_text()}")
    if not args.quiet:
        name = model.classes[1] if len(model.classes) == 2 else "foreground"
        print(f"wrote {args.output}: {name} {voxels} voxels, {millilitres:.1f} ml"
              + (f"; probabilities {args.probabilities}" if args.probabilities else "")
              + f" ({total:.1f} s)")
    return 0


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_segment_arguments(parser):
    parser.add_argument("ct", metavar="CT",
                        help="CT file (.nii, .nii.gz, .nrrd, .mha) or DICOM series folder")
    parser.add_argument("-o", "--output", metavar="MASK", required=True,
                        help="mask to write: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd (Slicer segmentation)")
    parser.add_argument("--model", metavar="FILE", help="model file (default: the shipped model)")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="threads (default: all cores)")
    parser.add_argument("--probabilities", metavar="FILE",
                        help="also write the pancreas probability (float32, 0..1) to FILE")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component (off by default)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--series", metavar="UID", help="the DICOM series to read from a folder with several")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and warnings")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="print the time per stage and the peak memory")


def _add_demo_arguments(sub):
    from .demo import DEFAULT_OUT, DEMO_SEED

    demo = sub.add_parser(
        "demo", prog="ternaryseg demo", help="segment a synthetic CT and show the result (see the README)",
        usage="ternaryseg demo [--out DIR] [--threads N] [--seed S] [--model FILE] [--overwrite]\n"
              "       ternaryseg demo --kernels [--size N] [--channels C] [--threads N] [--seed S]",
        description="Make a synthetic abdominal CT (a phantom on a 0.8 x 0.8 x 2 mm grid), segment it with "
                    "the model as `ternaryseg CT -o MASK` would, write DIR/phantom_ct.nii.gz, "
                    "DIR/pancreas_mask.nii.gz and DIR/demo.png, and print Dice against the phantom's "
                    "truth, the time per stage and the peak memory.")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help=f"folder for the three files (default ./{DEFAULT_OUT}; created if missing)")
    demo.add_argument("--threads", type=_positive_int, metavar="N", help="threads (default: all cores)")
    demo.add_argument("--seed", type=_seed, metavar="S", default=None,
                      help=f"phantom case (default {DEMO_SEED}, not used in training); with --kernels the "
                           "random network (default 0)")
    demo.add_argument("--model", metavar="FILE", help="model file (default: the shipped model)")
    demo.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo")
    demo.add_argument("--kernels", action="store_true",
                      help="instead time the popcount kernels on every CPU path with a small random ternary "
                           "network and check them against the numpy reference")
    demo.add_argument("--size", type=int, default=None, metavar="N",
                      help="--kernels: voxels per axis (default 96)")
    demo.add_argument("--channels", type=int, default=None, metavar="C",
                      help="--kernels: base channels (default 16)")
    # for tests: a smaller phantom grid
    demo.add_argument("--phantom-shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                      help=argparse.SUPPRESS)
    demo.add_argument("--phantom-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                      help=argparse.SUPPRESS)
    return demo


def _check_demo_arguments(parser, args):
    from .demo import DEFAULT_OUT, DEMO_SEED

    if args.kernels:
        given = [name for name in ("out", "model", "phantom_shape", "phantom_spacing")
                 if getattr(args, name) is not None] + (["overwrite"] if args.overwrite else [])
        if given:
            parser.error(f"--{given[0].replace('_', '-')} does not go with --kernels")
        args.size = 96 if args.size is None else args.size
        args.channels = 16 if args.channels is None else args.channels
        args.seed = 0 if args.seed is None else args.seed
        if args.size < 2 or args.channels < 1:
            parser.error("--size must be >= 2 and --channels >= 1")
        return
    if args.size is not None or args.channels is not None:
        parser.error("--size and --channels go with --kernels")
    if args.phantom_shape is not None and min(args.phantom_shape) < 2:
        parser.error("--phantom-shape needs 3 sizes >= 2")
    if args.phantom_spacing is not None and not all(0 < s < 100 for s in args.phantom_spacing):
        parser.error("--phantom-spacing needs 3 spacings in (0, 100) mm")
    args.out = DEFAULT_OUT if args.out is None else args.out
    args.seed = DEMO_SEED if args.seed is None else args.seed


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def main(argv=None):
    from . import __version__

    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal must not crash on "±" or "×"
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "segment")  # the bare form: ternaryseg CT -o MASK
    parser = argparse.ArgumentParser(
        prog="ternaryseg", description="Pancreas segmentation in abdominal CT on the CPU with a ternary "
        "(popcount) network.",
        usage="ternaryseg CT -o MASK [options]\n       ternaryseg {segment,info,demo} ...",
        epilog="`ternaryseg CT -o MASK` is short for `ternaryseg segment CT -o MASK`; "
        "`ternaryseg segment -h` lists its options.")
    parser.add_argument("--version", action="version", version=f"ternaryseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    segment = sub.add_parser("segment", prog="ternaryseg",
                             help="segment a CT: ternaryseg [segment] CT -o MASK")
    _add_segment_arguments(segment)
    sub.add_parser("info", prog="ternaryseg info", help="show the kernels library, CPU paths and threads")
    demo = _add_demo_arguments(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_demo_arguments(demo, args)
    if args.command == "info" or (args.command == "demo" and args.kernels):
        try:
            return _info(args) if args.command == "info" else _demo_kernels(args)
        except ImportError as error:
            print(f"ternaryseg: {error}", file=sys.stderr)
            return 2
    try:
        from . import pipeline
        from .model_file import ModelFileError
    except ImportError as error:
        print(f"ternaryseg: error: {error} (segmenting needs numpy, cffi and SimpleITK: "
              "pip install SimpleITK)", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _segment(args) if args.command == "segment" else _demo(args)
    except KeyboardInterrupt:
        print("\nternaryseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("ternaryseg: error: not enough memory", file=sys.stderr)
        return EXIT_ERROR
    except (pipeline.InputError, ModelFileError, OSError, ImportError) as error:
        # OSError: FileExistsError (no --overwrite), FileNotFoundError, unwritable folders, a full disk
        print(f"ternaryseg: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(error):
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    return text


if __name__ == "__main__":
    sys.exit(main())
