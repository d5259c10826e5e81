"""Batch segmentation with the module's Logic, without the GUI.

In 3D Slicer (headless)::

    Slicer --no-splash --no-main-window --python-script <module folder>/TernarySegmentationLib/batch.py \\
        --input CT_OR_DICOM_DIR --output OUT.seg.nrrd [--model FILE] [--threads N]
    Slicer --no-splash --no-main-window --python-script .../batch.py --input-dir CASES --output-dir OUT

or with any Python that has PyPI's ``slicer-core`` (and this package): ``python -m
TernarySegmentationLib.batch ...`` (or ``python path/to/batch.py ...``).

Each case (a CT file .nii.gz/.nii/.nrrd/.mha, or a DICOM series folder) is read as ``ternaryseg``
reads it, put into the MRML scene as a volume node, segmented by the Logic and saved as a Slicer
segmentation (.seg.nrrd) through Slicer's segmentation storage node. One line per case with its
time; a case that fails is reported and skipped; the exit status is 0 when every case succeeded,
1 when any failed, 2 for bad arguments. Existing outputs are never overwritten without
``--overwrite`` (``--skip-existing`` skips those cases instead).
"""

import argparse
import contextlib
import os
import sys
import time

if __name__ == "__main__" and not __package__:
    # Run as a script (Slicer --python-script, or python batch.py): import the package from the
    # folder above, not this folder's modules as top-level ones (Slicer puts the script's folder first).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from TernarySegmentationLib import _atomic, pipeline  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OUTPUT_SUFFIX = ".seg.nrrd"


def _threads(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="TernarySegmentation batch",
        description="Segment the pancreas of CT volumes with the TernarySegmentation module's Logic "
                    "and write Slicer segmentations (.seg.nrrd).")
    one = parser.add_argument_group("one case")
    one.add_argument("--input", metavar="CT_OR_DICOM_DIR",
                     help="a CT file (.nii.gz, .nii, .nrrd, .mha) or a DICOM series folder")
    one.add_argument("--output", metavar="OUT.seg.nrrd", help="the segmentation file to write")
    one.add_argument("--series", metavar="UID",
                     help="the DICOM series to segment when the --input folder holds several")
    many = parser.add_argument_group("a folder of cases")
    many.add_argument("--input-dir", metavar="DIR",
                      help="every CT file and every sub-folder (a DICOM series) of DIR is one case")
    many.add_argument("--output-dir", metavar="DIR",
                      help="where <case>.seg.nrrd is written (created if missing)")
    parser.add_argument("--model", metavar="FILE", help="model file (.tsm); default: the shipped model")
    parser.add_argument("--threads", type=_threads, metavar="N", help="CPU threads (default: all cores)")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--skip-existing", action="store_true",
                        help="folder mode: skip cases whose output file exists")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    single = args.input is not None or args.output is not None
    folder = args.input_dir is not None or args.output_dir is not None
    if single and folder:
        parser.error("give either --input/--output or --input-dir/--output-dir, not both")
    if single and (args.input is None or args.output is None):
        parser.error("--input and --output go together")
    if folder and (args.input_dir is None or args.output_dir is None):
        parser.error("--input-dir and --output-dir go together")
    if not single and not folder:
        parser.error("nothing to do: give --input CT --output OUT.seg.nrrd, or --input-dir and --output-dir")
    if args.overwrite and args.skip_existing:
        parser.error("--overwrite and --skip-existing contradict each other")
    if args.series is not None and args.input is None:
        parser.error("--series goes with --input (a DICOM folder); in folder mode each sub-folder must "
                     "hold one series")
    if single and not args.output.lower().endswith(OUTPUT_SUFFIX):
        parser.error(f"--output must name a {OUTPUT_SUFFIX} file, got {args.output}")
    if folder:
        if not os.path.isdir(args.input_dir):
            parser.error(f"--input-dir {args.input_dir}: not a folder")
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            parser.error(f"--output-dir {args.output_dir}: exists and is not a folder")
    if args.model is not None and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file")
    return args


def case_name(path):
    """The name of a case: its file name without the image suffix, or its folder name."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in pipeline.IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


def find_cases(folder):
    """(name, input path) of every case in ``folder``, sorted by name: CT files with a known suffix
    (segmentations, *.seg.nrrd, excluded) and sub-folders (DICOM series); hidden entries ignored."""
    cases = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            continue
        lower = entry.lower()
        if os.path.isdir(path) or (lower.endswith(pipeline.IMAGE_SUFFIXES) and not lower.endswith(OUTPUT_SUFFIX)):
            cases.append((case_name(path), path))
    return cases


def save_segmentation(segmentationNode, path, overwrite=False):
    """Write ``segmentationNode`` to ``path`` (.seg.nrrd) with Slicer's segmentation storage node,
    atomically: a temporary file beside it, then moved into place; never replaces an existing file
    without ``overwrite``."""
    import slicer

    if not overwrite and os.path.lexists(path):
        raise _atomic.exists_error(path, "the segmentation")
    temporary = _atomic.temporary_path(path, OUTPUT_SUFFIX)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(temporary)
    try:
        if not storage.WriteData(segmentationNode):
            raise OSError(f"{path}: could not write the segmentation")
        _atomic.publish(temporary, path, overwrite, "the segmentation")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def run_case(logic, source, output, args):
    """Segment one case; returns the job (timings, volumes, warnings). Raises on failure."""
    import slicer

    from TernarySegmentationLib.slicer_logic import image_to_volume

    pipeline.check_output_path(output, overwrite=args.overwrite)
    image = pipeline.read_image(source, series=args.series)
    scene = slicer.mrmlScene
    volume = image_to_volume(image, name=case_name(source))
    segmentation = None
    try:
        job = logic.prepare(volume, modelPath=args.model, threads=args.threads,
                            largestComponent=args.largest_component)
        job.run()
        segmentation = logic.apply(job)
        save_segmentation(segmentation, output, overwrite=args.overwrite)
        return job
    finally:  # a batch must not accumulate nodes
        for node in (segmentation, volume):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)


def make_logic():
    """The Logic: the module's class inside Slicer, the same SegmentationLogic otherwise."""
    from TernarySegmentationLib.slicer_logic import SegmentationLogic, headless_scene

    import slicer

    headless_scene()  # slicer.mrmlScene: Slicer's own, or a new one on slicer-core
    if getattr(slicer, "app", None) is not None:
        from TernarySegmentation import TernarySegmentationLogic  # in Slicer: the module's class
        return TernarySegmentationLogic()
    return SegmentationLogic()


def main(argv=None, out=None):
    out = out or sys.stdout
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # argparse: usage errors and --help
        return EXIT_USAGE if stop.code else EXIT_OK
    if args.input is not None:
        cases = [(case_name(args.input), args.input, args.output)]
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        cases = [(name, path, os.path.join(args.output_dir, name + OUTPUT_SUFFIX))
                 for name, path in find_cases(args.input_dir)]
        if not cases:
            print(f"no cases in {args.input_dir} (CT files {', '.join(pipeline.IMAGE_SUFFIXES)} or DICOM "
                  "folders)", file=out)
            return EXIT_FAILED
    logic = make_logic()
    failed, skipped, started = [], [], time.perf_counter()
    width = len(str(len(cases)))
    for number, (name, source, output) in enumerate(cases, 1):
        prefix = f"[{number:{width}d}/{len(cases)}] {name}"
        if args.skip_existing and os.path.lexists(output):
            skipped.append(name)
            print(f"{prefix}: skipped, {output} exists", file=out, flush=True)
            continue
        start = time.perf_counter()
        try:
            job = run_case(logic, source, output, args)
        except Exception as error:  # report the case and go on with the next one
            failed.append(name)
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{prefix}: FAILED ({time.perf_counter() - start:.1f} s): {message}", file=out, flush=True)
            continue
        for warning in job.warnings:
            print(f"{prefix}: warning: {warning}", file=out)
        print(f"{prefix}: {job.volumesText()} -> {output} "
              f"({time.perf_counter() - start:.1f} s)", file=out, flush=True)
    done = len(cases) - len(failed) - len(skipped)
    summary = f"{len(cases)} case{'s' if len(cases) != 1 else ''}: {done} segmented"
    if skipped:
        summary += f", {len(skipped)} skipped"
    if failed:
        summary += f", {len(failed)} FAILED ({', '.join(failed)})"
    print(f"{summary}; {time.perf_counter() - started:.1f} s in all", file=out, flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def run_and_exit(argv=None):
    """main() for a script: any unexpected error becomes exit status 1 with its traceback, so that a
    headless Slicer never stays open after a failure (--python-script does not quit on an error)."""
    try:
        code = main(argv)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        code = EXIT_FAILED
    sys.exit(code)


if __name__ == "__main__":
    run_and_exit()
