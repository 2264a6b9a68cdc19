"""Int8 versions of the body nets shipped in pipeline/segmentation/models/ (``python -m pipeline.training.quantize_nets``).

Post-training static quantisation with ONNX Runtime (``onnxruntime.quantization.quantize_static``, QDQ format):
weights int8 per output channel, activations uint8, their ranges (min / max) recorded while the float net
segments calibration cases. The calibration inputs are exactly what the net sees in the pipeline: every input its
ONNX Runtime session is fed while :func:`pipeline.segmentation.segment.segment_vertebrae` segments every third real
annotated scan of ``../shared/data/vertebral-bodies`` (14 of 42, all three sources) and two synthetic phantoms
(T2, T1 and STIR). Weights use 7 of their 8 bits (``reduce_range``): without it, CPUs without VNNI instructions
can saturate int16 intermediate sums in the uint8 x int8 kernels, and a study's result would then depend on the
CPU it ran on.

The int8 nets are 2-3 x faster than the float ones on one core (``segmentation.int8``, README "Speed"); how
much they change the outlines and names is measured by ``modicscan evaluate-segmentation`` with and without
them (README). Needs the ``onnx`` package (the ``train`` extra); about 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import SegmentationConfig

DATA = Path("../shared/data/vertebral-bodies")
CALIBRATION_EVERY = 3  # every third annotated scan (14 of 42, all three sources) calibrates the ranges
PHANTOM_SEEDS = (101, 102)  # synthetic studies (T2, T1, STIR) whose fractures and lesions widen the ranges


def calibration_images(cases_csv: Path, work: Path, fold: int | None = None, source: str | None = None
                       ) -> list[tuple[np.ndarray, tuple, list[np.ndarray]]]:
    """(T2 image, spacing, [other contrasts]) on the segmenter's frame: real annotated scans and phantoms. ``fold``
    / ``source``: leave that fold's (or source's) scans out (for a held-out net's int8 copy)."""
    from pipeline import phantom
    from pipeline.config import Config
    from pipeline.evaluation.cases import held_out, load_case, read_cases
    from pipeline.io.discovery import discover
    from pipeline.io.volumes import load_series
    from pipeline.roles import assign_roles

    out = []
    if cases_csv.is_file():
        rows = read_cases(cases_csv)
        if fold is not None or source is not None:
            rows = [r for r, held in zip(rows, held_out(rows, fold=fold, source=source), strict=True) if not held]
        for row in rows[::CALIBRATION_EVERY]:
            image, _, spacing = load_case(row)
            out.append((image, spacing, []))
    cfg = Config()
    for seed in PHANTOM_SEEDS:
        phantom.make_study(work, seed, matrix=256, study_name=f"cal{seed}")
        study = next(iter(discover(work / f"cal{seed}", cfg.loading).studies.values()))
        roles = assign_roles(study, cfg.roles)
        vols = {r: load_series(study.series[roles.roles[r].series_uid], cfg.loading) for r in ("T2", "T1", "STIR")}
        out.append((vols["T2"].data, vols["T2"].spacing, [vols["T1"].data, vols["STIR"].data]))
    return out


def record_net_inputs(body_model: str, images) -> list[np.ndarray]:
    """Every input chunk the float net of ``body_model`` runs on while the images are segmented."""
    from pipeline.errors import StudyError
    from pipeline.segmentation import unet
    from pipeline.segmentation.segment import segment_vertebrae

    chunks: list[np.ndarray] = []
    real_load = unet.load_session

    class Recording:
        """The net's session, keeping a copy of every input it is fed (padded and chunked by ``unet.run_net``)."""

        def __init__(self, session):
            self._session = session

        def get_inputs(self):
            return self._session.get_inputs()

        def run(self, names, feeds):
            chunks.extend(np.array(x, np.float32) for x in feeds.values())
            return self._session.run(names, feeds)

    unet.load_session = lambda *a, **k: Recording(real_load(*a, **k))
    try:
        cfg = SegmentationConfig(body_model=body_model, refine_edges=False, int8=False)  # the float net
        for image, spacing, extra in images:
            try:
                segment_vertebrae(image, spacing, cfg, extra_images=extra)
            except StudyError:  # a case that fails later in segmentation still calibrated the net
                pass
    finally:
        unet.load_session = real_load
    if not chunks:
        raise SystemExit(f"no calibration input was recorded for the {body_model} net: nothing to quantise")
    return chunks


def float_net_digest(path: Path) -> str:
    """SHA-256 of a float net's file: recorded in its int8 version (``metadata_props``: ``float_net_sha256``), so a
    float net retrained without quantising it again is caught (tests/test_unet.py)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_source(dst: Path, src: Path) -> None:
    """Write the float net's digest into the int8 file's metadata (the weights are left as they are)."""
    import onnx

    model = onnx.load(str(dst))
    props = {p.key: p.value for p in model.metadata_props}
    props["float_net_sha256"] = float_net_digest(src)
    props["float_net"] = Path(src).name
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))


def quantize(src: Path, dst: Path, chunks: list[np.ndarray]) -> None:
    """Write the QDQ int8 version of the float net ``src`` to ``dst``, ranges from ``chunks``; the float net's
    digest goes into its metadata (:func:`record_source`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"x": c[i:i + 1]} for c in chunks for i in range(c.shape[0])])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # the nets take any slice size: symbolic shape inference cannot finish on them, ONNX's own can
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    record_source(dst, src)


def main(argv=None) -> int:
    from pipeline.segmentation import unet

    ap = argparse.ArgumentParser(prog="python -m pipeline.training.quantize_nets", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=DATA / "cases.csv", help="annotated scans for the calibration")
    ap.add_argument("--nets", nargs="+", choices=("unet", "onepass"), default=["unet", "onepass"])
    ap.add_argument("--net-file", type=Path, help="quantise this float net (e.g. a held-out fold's) instead of the "
                                                  "shipped one; needs one --nets and --out")
    ap.add_argument("--out", type=Path, help="with --net-file: where to write its int8 copy")
    ap.add_argument("--fold", type=int, choices=(0, 1, 2), help="calibrate without this fold's scans")
    ap.add_argument("--source", help="calibrate without this source's scans")
    args = ap.parse_args(argv)
    if args.net_file and (len(args.nets) != 1 or not args.out):
        ap.error("--net-file needs exactly one --nets (the body model it is) and --out")
    if not args.cases.is_file():
        print(f"note: {args.cases} not found: calibrating on phantoms only")
    with tempfile.TemporaryDirectory() as tmp:
        images = calibration_images(args.cases, Path(tmp), args.fold, args.source)
    if args.net_file:
        unet.use_network(args.net_file)  # the net run while recording is the one quantised
    for body_model in args.nets:
        chunks = record_net_inputs(body_model, images)
        src = args.net_file or unet.net_path(body_model)
        dst = args.out or unet.int8_path(body_model)
        quantize(src, dst, chunks)
        print(f"{dst}: from {src.name}, {sum(c.shape[0] for c in chunks)} calibration slices")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
