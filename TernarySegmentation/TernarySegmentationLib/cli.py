"""The ``ternaryseg`` command line.

``ternaryseg info`` prints the kernels library, the CPU paths and threads. ``ternaryseg demo`` runs
the demo: until the trained model lands (training and inference issues), it runs a small ternary
3D encoder-decoder with random weights through the popcount kernels on every CPU path, checks each
path bit for bit against the numpy reference and prints the speed.
"""

import argparse
import sys
import time

import numpy as np


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


def _demo(args):
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


def _network_macs(size, c):
    full, half = size ** 3, ((size + 1) // 2) ** 3
    return 27 * (full * c * 1 + full * c * c + half * c * 2 * c + half * 4 * c * c
                 + full * 3 * c * c + full * c * c)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ternaryseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show the kernels library, CPU paths and threads")
    demo = sub.add_parser("demo", help="run the demo (see the README)")
    demo.add_argument("--size", type=int, default=96, help="voxels per axis (default 96)")
    demo.add_argument("--channels", type=int, default=16, help="base channels (default 16)")
    demo.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo" and (args.size < 2 or args.channels < 1 or
                                   (args.threads is not None and args.threads < 1)):
        parser.error("--size must be >= 2, --channels >= 1 and --threads >= 1")
    try:
        return {"info": _info, "demo": _demo}[args.command](args)
    except ImportError as error:
        print(f"ternaryseg: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
