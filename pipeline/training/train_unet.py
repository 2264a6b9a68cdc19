"""Train the 2.5-D body U-Net shipped as ``pipeline/segmentation/models/body_unet.onnx`` (``python -m pipeline.training.train_unet``).

Needs PyTorch and onnx (``pip install torch==2.13.0 && pip install -e ".[train]"``; the pipeline itself runs
the exported net with ONNX Runtime only).

Training data: every slice holding an annotated body (plus ``MARGIN_MM`` either side) of the real scans in
``../shared/data/vertebral-bodies/cases.csv``, and of synthetic phantom studies (T1 / T2 / STIR, planted
fractures and Modic bands: abnormal marrow is still body; their sacrum below S1 is unknown, as on the real
scans). The healthy T2 scans (vb2) annotate T11-L5 only: their S1, in view, is pseudo-labelled from the pixel
classifier (:func:`pseudo_sacrum`), so the net learns the sacrum's top as a body and levels can be counted from
it. Input: the normalised working-grid slice and its neighbours ``CONTEXT_MM`` away
(:func:`pipeline.segmentation.unet.context_stack`). Target: any body voxel. The loss (BCE + soft Dice) only counts the rows
whose labels are known (:func:`pipeline.training.train_segmenter._rows_known`: vb3 annotates L1-L5 only, so T12 and S1
there are neither body nor background).

The one-pass net (``--onepass``) has a second output, L5 (:func:`l5_mask`: the lowest annotated body of the
sources in ``LOWEST_IS_L5``, the phantoms' L5; unknown on vb1, whose run of levels is not given): the labelling's
anchor (:mod:`pipeline.segmentation.labelling`, ``L5_NET_WEIGHT``). ``--l5-cases C --l5-reading R`` adds single
slices on which only L5 is known, from a reader (:mod:`pipeline.training.reader_l5`: SPIDER); ``--l5-fold K``
leaves out their patients of fold K (of 2) for ``python -m pipeline.evaluation.levels --fold K``.

Batches: ``BATCH`` random ``PATCH`` x ``PATCH`` crops, 80 % holding a body voxel, a fraction ``PHANTOM_SHARE``
from phantom slices, each rotated (up to ``ROTATE_DEG``) and zoomed (up to exp(+-``SCALE_LOG``)), its side slices
swapped half of the time, and a random gamma on the intensities (log-sd 0.25: contrast between scanners;
:func:`sample_batch`). AdamW, cosine-decayed learning rate; ~0.55 s per step on two cores.

``--fold K`` trains without the cases of fold K (``train_segmenter.case_folds``: the folds of ``--cv cases``), for
held-out evaluation: ``modicscan evaluate-segmentation CASES --unet foldK.onnx --model foldK.joblib --fold K``.
``--source S`` trains without source S's cases (leave-one-source-out; evaluate with ``--source S``).
The pseudo-labelled S1s come from the shipped classifier also then (it saw every case; only training cases' S1s
are labelled with it, never a held-out case's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.arrays import label_counts_and_centroids
from pipeline.config import SegmentationConfig
from pipeline.evaluation.cases import DEFAULT_CASES, held_out, load_case, read_cases, refuse_unknown_source
from pipeline.segmentation.grid import normalise
from pipeline.segmentation.segment import segment_vertebrae
from pipeline.segmentation.unet import DOWNSAMPLINGS, ONEPASS_PATH, UNET_PATH, context_stack
from pipeline.training.randomise import randomise_crop
from pipeline.training.samples import _rows_below, _rows_known, phantom_rows
from pipeline.types import level_value

MARGIN_MM = 8.0  # slices this far beside the outermost body slices are trained on too (background only)
PATCH, BATCH = 128, 16
PHANTOM_SHARE = 0.15  # of the crops; phantoms teach contrasts and lesions, the real scans the anatomy
BASE_CHANNELS = 16
LEARNING_RATE = 2e-3
GAMMA_LOG_SD = 0.25
ROTATE_DEG = 15.0  # crops are rotated by up to this (sample_batch)
SCALE_LOG = 0.15  # and zoomed by up to exp(+-this): +-16 %
# The one-pass net (--onepass): a quarter of the cascade net's width (it runs on whole slices, 4x the pixels), half
# of the crops domain-randomised (randomise.py), more crops anywhere in the slice (it sees the whole field of view).
# Its second output is L5 (the labelling's anchor: which body is L5 is read from anatomy the net sees, the sacrum
# under it, the iliac crests beside it, not only from the shape of the column's end).
# A fraction ``single_slice`` of its crops has no side slices (all three channels the middle one): a 2-D study
# (one mid-sagittal slice, SPIDER) gives the net exactly that input, never seen in training otherwise.
# A fraction ``reader_share`` of its crops comes from the read single slices (--l5-cases, reader_l5.py): a few
# dozen slices, but the only real ones where S1 is seen whole above the sacrum with L5 known.
ONEPASS = {"base": 8, "randomise": 0.5, "body_share": 0.65, "outputs": 2, "single_slice": 0.15, "reader_share": 0.2}
LOWEST_IS_L5 = ("vb2", "vb3")  # sources whose lowest annotated body is L5 (the data's README: T11-L5, L1-L5)
PSEUDO_S1_MIN_ML = 10.0  # a pseudo-labelled S1 smaller than this is a fragment, not the sacrum's top


def pseudo_sacrum(lab: np.ndarray, seg: np.ndarray, sp) -> np.ndarray | None:
    """Mask of the first sacral body under an annotation that ends at L5, taken from a segmentation ``seg`` of the
    same working-frame (I, P, R) grid; None when no piece qualifies.

    The piece is the largest one of ``seg`` that overlaps no annotated body, has >= ``PSEUDO_S1_MIN_ML`` and a
    centroid 0.6-1.2 body spacings (median gap between the annotated bodies' centroids) below the lowest annotated
    body's and behind it (S1 sits posterior to L5 in the lordosis; in front of it lie the pelvic organs, where the
    pixel classifier sometimes finds a body-like blob)."""
    ids = np.unique(lab[lab > 0])
    if ids.size < 2:
        return None
    _, cents = label_counts_and_centroids(lab, ids)
    cents = cents[np.argsort(cents[:, 0])]
    spacing = float(np.median(np.diff(cents[:, 0]))) * sp[0]
    lowest = cents[-1]
    pieces = np.unique(seg[(seg > 0) & (lab == 0)])
    if pieces.size == 0:
        return None
    counts, pc = label_counts_and_centroids(seg, pieces)
    touching = np.unique(seg[(seg > 0) & (lab > 0)])
    below = (pc[:, 0] - lowest[0]) * sp[0]
    ok = ((below >= 0.6 * spacing) & (below <= 1.2 * spacing) & (pc[:, 1] > lowest[1])
          & (counts * float(np.prod(sp)) / 1000.0 >= PSEUDO_S1_MIN_ML) & ~np.isin(pieces, touching))
    if not ok.any():
        return None
    return seg == pieces[np.flatnonzero(ok)[np.argmax(counts[ok])]]


def l5_mask(row: dict, lab: np.ndarray) -> np.ndarray | None:
    """Voxels of L5 in a row's labels; None when the row does not say which body is L5.

    A phantom's labels are level values (:func:`pipeline.types.level_value`). A real scan's are the annotators'
    own numbers; with ``row["lowest_is_l5"]`` (vb2 annotates T11-L5, vb3 L1-L5) its lowest annotated body
    (by centroid) is L5."""
    if row.get("source") == "phantom":
        return lab == level_value("L5")
    if not row.get("lowest_is_l5"):
        return None
    ids = np.unique(lab[lab > 0])
    if ids.size == 0:
        return None
    _, cents = label_counts_and_centroids(lab, ids)
    return lab == ids[np.argmax(cents[:, 0])]


def case_slices(row: dict) -> list[tuple]:
    """Training slices of one image/labels row: (input (3, H, W) float32, body (H, W) bool, known (H, W) bool,
    L5 (H, W) bool, L5 known: bool) each.

    ``row["pseudo_s1"]``: the annotation ends at L5 with S1 in view; the shipped pixel classifier's S1
    (:func:`pseudo_sacrum`) is added as body, so the net learns that the sacrum's top is a body (vb2 never annotates
    it; without it the net missed S1 there and the levels were counted one too low). The L5 target
    (:func:`l5_mask`) is known on the whole slice, or nowhere: everything that is not L5 is not L5, annotated or not.
    """
    work, lab, sp = load_case(row)
    l5 = l5_mask(row, lab)
    body = lab > 0
    if row.get("pseudo_s1") and body.any():
        seg = segment_vertebrae(work, sp, SegmentationConfig(body_model="classifier"), keep_below_s1=True).labels
        s1 = pseudo_sacrum(lab, seg, sp)
        if s1 is not None:
            body = body | s1
    if not body.any():
        return []
    known = _rows_known(body, 3, _rows_below(row, sp[0]))
    ks = np.flatnonzero(body.any(axis=(0, 1)))
    m = int(round(MARGIN_MM / sp[2]))
    ks = np.arange(max(0, ks[0] - m), min(body.shape[2], ks[-1] + m + 1))
    x = context_stack(normalise(work), sp[2], ks)
    l5_known = l5 is not None
    l5 = np.zeros_like(body) if l5 is None else l5
    return [(x[i], body[:, :, k], np.ascontiguousarray(known[:, :, k]), l5[:, :, k], l5_known)
            for i, k in enumerate(ks)]


SLICE_ARRAYS = ("x", "body", "known", "l5", "l5_known")  # the fields of a training slice, as kept in a cache file


def _cached(path: Path | None, make) -> list[tuple]:
    """``make()``'s training slices, kept in the .npz file ``path`` (None: not kept) and read back from it later.
    An empty list is kept too (zero-length arrays): a case that gives no slice is not prepared again."""
    if path is None:
        return make()
    if path.is_file():
        with np.load(path) as z:
            x, body, known, l5, l5_known = (z[k] for k in SLICE_ARRAYS)
            return list(zip(x, body, known, l5, l5_known.tolist(), strict=True))
    slices = make()
    import io

    from pipeline.io.atomic import write_bytes_atomic

    arrays = ({k: np.stack(a) for k, a in zip(SLICE_ARRAYS, zip(*slices, strict=True), strict=True)} if slices
              else dict.fromkeys(SLICE_ARRAYS, np.zeros(0)))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())  # two trainings filling one cache never see half a file
    return slices


def cached_case_slices(row: dict, cache: Path | None) -> list[tuple]:
    """:func:`case_slices`, kept in ``cache`` (one .npz per case, pseudo-S1 and L5 choice) when a folder is given:
    the fold / source nets of an evaluation read the same slices (the pseudo-S1 segmentation takes seconds a case)."""
    name = f"{row['case']}_s1{int(bool(row.get('pseudo_s1')))}_l5{int(bool(row.get('lowest_is_l5')))}.npz"
    return _cached(Path(cache) / name if cache else None, lambda: case_slices(row))


def cached_reader_slices(row: dict, cache: Path | None) -> list[tuple]:
    """:func:`pipeline.training.reader_l5.reader_case_slices`, kept in ``cache`` as ``<case>_reader_l5_<row mm>.npz``
    (a revised reading of the case is prepared anew; a changed segmentation model is not noticed: clear the cache
    after retraining the cascade)."""
    from pipeline.training import reader_l5

    name = f"{row['case']}_reader_l5_{float(row['l5_row_mm']):.1f}.npz"
    return _cached(Path(cache) / name if cache else None, lambda: reader_l5.reader_case_slices(row))


def _crop_coords(centre, patch: int, angle: float, scale: float) -> np.ndarray:
    """(2, P, P) slice coordinates of a ``patch`` x ``patch`` crop around ``centre``, rotated by ``angle`` (radians)
    and zoomed by ``scale`` (> 1: the crop covers more of the slice, anatomy looks smaller)."""
    g = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    rr, cc = np.meshgrid(g, g, indexing="ij")
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    return np.stack([centre[0] + cos * rr - sin * cc, centre[1] + sin * rr + cos * cc])


def sample_batch(real: list, phantom: list, rng: np.random.Generator, batch: int = BATCH, patch: int = PATCH,
                 phantom_share: float = PHANTOM_SHARE, rotate_deg: float = ROTATE_DEG,
                 scale_log: float = SCALE_LOG, randomise: float = 0.0, body_share: float = 0.8,
                 level_channel: bool = False, single_slice: float = 0.0, reader: list | None = None,
                 reader_share: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (B, 3, P, P), y (B, C, P, P), mask (B, C, P, P)) float32 crops; zero (and unknown) outside the slice.
    Channel 0 is body; with ``level_channel`` channel 1 is L5, known on the slices whose L5 is known
    (:func:`case_slices`; a slice tuple without it: unknown).

    A fraction ``reader_share`` of the crops comes from ``reader`` (slices whose L5 alone is known,
    :mod:`pipeline.training.reader_l5`), ``phantom_share`` from ``phantom``, the rest from ``real``.
    A fraction ``body_share`` of the crops holds a body voxel (L5's, where only L5 is known), the rest lie anywhere. Each crop is rotated by up to
    ``rotate_deg`` and zoomed by up to exp(+-``scale_log``) (spines lean and scanners and patients differ in size;
    the 41 real scans alone do not show enough of either), its two side slices swap places half of the time (left
    and right context are alike), and its intensities get a random gamma; a fraction ``randomise`` of the crops is
    domain-randomised on top (:func:`pipeline.training.randomise.randomise_crop`); a fraction ``single_slice``
    loses its side slices (all channels the middle one, as :func:`pipeline.segmentation.unet.context_stack` gives
    for a one-slice study)."""
    from scipy import ndimage

    xs = np.zeros((batch, 3, patch, patch), np.float32)
    n_out = 1 + int(level_channel)
    ys = np.zeros((batch, n_out, patch, patch), np.float32)
    ms = np.zeros((batch, n_out, patch, patch), np.float32)
    for b in range(batch):
        u = rng.random() if reader or phantom else 1.0  # no draw without a second pool (seeds reproduce as before)
        pool = (reader if reader and u < reader_share else
                phantom if phantom and u < reader_share + phantom_share else real)
        x, y, m, *level = pool[rng.integers(len(pool))]
        h, w = y.shape
        target = y if y.any() or not level else level[0]
        if target.any() and rng.random() < body_share:  # a body voxel anywhere in the crop
            rr, cc = np.nonzero(target)
            j = rng.integers(rr.size)
            centre = np.array([rr[j], cc[j]], float) + rng.uniform(-patch / 2, patch / 2, 2)
        else:
            centre = np.array([rng.uniform(-16, h + 16), rng.uniform(-16, w + 16)])
        # keep the crop inside the slice where the slice is large enough (as an unrotated crop would be)
        for a, n in enumerate((h, w)):
            centre[a] = np.clip(centre[a], min(patch / 2, n / 2), max(n - patch / 2, n / 2)) - 0.5
        angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
        coords = _crop_coords(centre, patch, angle, float(np.exp(rng.uniform(-scale_log, scale_log))))
        inside = ((coords[0] > -0.5) & (coords[0] < h - 0.5) & (coords[1] > -0.5) & (coords[1] < w - 0.5))
        channels = (2, 1, 0) if rng.random() < 0.5 else (0, 1, 2)
        if single_slice and rng.random() < single_slice:
            channels = (1, 1, 1)
        g = float(np.exp(rng.normal(0.0, GAMMA_LOG_SD)))  # contrast between scanners: a monotone remap
        for c, src in enumerate(channels):  # "nearest" up to the slice's outer pixel edge, zero beyond it
            sub = ndimage.map_coordinates(x[src], coords, order=1, mode="nearest") * inside
            xs[b, c] = np.sign(sub) * np.abs(sub) ** g
        if randomise and rng.random() < randomise:
            xs[b] = randomise_crop(xs[b], inside, rng)
        ys[b, 0] = (ndimage.map_coordinates(y.astype(np.float32), coords, order=1, mode="nearest") >= 0.5) & inside
        ms[b, 0] = (ndimage.map_coordinates(m.astype(np.float32), coords, order=0, mode="nearest") > 0) & inside
        if level_channel and level and level[1]:
            l5 = ndimage.map_coordinates(level[0].astype(np.float32), coords, order=1, mode="nearest") >= 0.5
            ys[b, 1], ms[b, 1] = l5 & inside, inside
    return xs, ys, ms


def build_net(base: int = BASE_CHANNELS, depth: int = DOWNSAMPLINGS, outputs: int = 1):
    """2-D U-Net (Ronneberger et al. 2015): double 3x3 conv + BatchNorm + ReLU per level, max-pool down,
    transposed conv up, skip connections, ``outputs`` logits per pixel (body; L5)."""
    import torch
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            ch = [base * 2 ** i for i in range(depth + 1)]
            self.down = nn.ModuleList([block(3, ch[0])] + [block(ch[i], ch[i + 1]) for i in range(depth)])
            self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(depth))])
            self.dec = nn.ModuleList([block(2 * ch[i], ch[i]) for i in reversed(range(depth))])
            self.head = nn.Conv2d(ch[0], outputs, 1)

        def forward(self, x):
            skips = []
            for i, d in enumerate(self.down):
                x = d(x if i == 0 else nn.functional.max_pool2d(x, 2))
                skips.append(x)
            x = skips.pop()
            for u, d in zip(self.up, self.dec, strict=True):
                x = d(torch.cat([u(x), skips.pop()], 1))
            return self.head(x)

    return UNet()


def masked_loss(logit, y, mask):
    """BCE + soft Dice over the known pixels only, summed over the output channels."""
    import torch
    from torch import nn

    total = 0.0
    for c in range(logit.shape[1]):
        lc, yc, mc = logit[:, c], y[:, c], mask[:, c]
        bce = (nn.functional.binary_cross_entropy_with_logits(lc, yc, reduction="none") * mc).sum() / mc.sum().clamp(min=1)
        p = torch.sigmoid(lc) * mc
        total = total + bce + 1 - (2 * (p * yc).sum() + 1) / (p.sum() + (yc * mc).sum() + 1)
    return total


def fit(real: list, phantom: list, iters: int, seed: int = 0, threads: int = 2, log_every: int = 100,
        rotate_deg: float = ROTATE_DEG, scale_log: float = SCALE_LOG, base: int = BASE_CHANNELS,
        randomise: float = 0.0, body_share: float = 0.8, outputs: int = 1, single_slice: float = 0.0,
        reader: list | None = None, reader_share: float = 0.0):
    """Train a U-Net of ``base`` channels and ``outputs`` output channels (2: body and L5) on the slices (see
    :func:`case_slices`; augmentation: :func:`sample_batch`); returns the net in eval mode."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    net = build_net(base, outputs=outputs)
    opt = torch.optim.AdamW(net.parameters(), LEARNING_RATE, weight_decay=1e-4)
    t0 = time.time()
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * it / max(1, iters)))
        batch = sample_batch(real, phantom, rng, rotate_deg=rotate_deg, scale_log=scale_log, randomise=randomise,
                             body_share=body_share, level_channel=outputs > 1, single_slice=single_slice,
                             reader=reader, reader_share=reader_share)
        x, y, m = (torch.from_numpy(a) for a in batch)
        loss = masked_loss(net(x), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (it + 1) % log_every == 0:
            print(f"step {it + 1}/{iters}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    return net.eval()


def export_onnx(net, path: Path) -> None:
    """ONNX file with free batch, height and width (the pipeline pads to multiples of 16)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "n", 2: "h", 3: "w"}
    torch.onnx.export(net, (torch.zeros(2, 3, 160, 160),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": axes, "y": axes}, dynamo=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.training.train_unet")
    ap.add_argument("cases_csv", nargs="?", default=str(DEFAULT_CASES))
    ap.add_argument("--out", default=None, help="ONNX file written (default: the shipped net of the kind trained)")
    ap.add_argument("--onepass", action="store_true",
                    help=f"train the one-pass net (segmentation.body_model: onepass): base {ONEPASS['base']} channels, "
                         f"{ONEPASS['randomise'] * 100:.0f} %% of the crops domain-randomised")
    ap.add_argument("--base", type=int, help=f"channels of the first level (default {BASE_CHANNELS}, --onepass "
                                              f"{ONEPASS['base']})")
    ap.add_argument("--randomise", type=float, help=f"share of domain-randomised crops (default 0, --onepass "
                                                     f"{ONEPASS['randomise']})")
    ap.add_argument("--cache", type=Path, help="keep the prepared training slices here (reused by later runs)")
    ap.add_argument("--fold", type=int, help="leave out the cases of this fold (0-2, as --cv cases) for evaluation")
    ap.add_argument("--source", help="leave out the cases of this source (leave-one-source-out evaluation)")
    ap.add_argument("--iters", type=int, default=4500, help="training steps (default %(default)s, ~40 min on 2 cores)")
    ap.add_argument("--phantoms", type=int, default=12, help="synthetic studies added (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rotate-deg", type=float, default=ROTATE_DEG, help="crop rotation range (default +-%(default)s)")
    ap.add_argument("--scale-log", type=float, default=SCALE_LOG, help="crop zoom range, log (default +-%(default)s)")
    ap.add_argument("--pseudo-s1", action="append", metavar="SOURCE",
                    help="source whose annotation ends at L5 with S1 in view: its S1 is pseudo-labelled from the pixel "
                         "classifier (repeatable; default: vb2)")
    ap.add_argument("--l5-cases", type=Path, help="--onepass: single-slice cases (case,patient,t1,t2; SPIDER's "
                    "cases.csv) whose L5 a reader placed (--l5-reading) train the L5 output too")
    ap.add_argument("--l5-reading", type=Path, help="case,l5_row_mm: the reading of --l5-cases "
                    "(docs/spider_l5_reading.csv)")
    ap.add_argument("--l5-fold", type=int, choices=(0, 1), help="leave out the --l5-cases patients of this fold "
                    "(of 2; evaluate with python -m pipeline.evaluation.levels --fold K)")
    a = ap.parse_args(argv)
    if (a.l5_cases is None) != (a.l5_reading is None) or (a.l5_cases and not a.onepass):
        ap.error("--l5-cases and --l5-reading go together, with --onepass")
    if a.l5_fold is not None and a.l5_cases is None:
        ap.error("--l5-fold leaves out read cases: give --l5-cases and --l5-reading")
    rows = read_cases(Path(a.cases_csv))
    refuse_unknown_source(ap, rows, a.source)
    for r in rows:
        r["pseudo_s1"] = r.get("source") in (a.pseudo_s1 or ["vb2"])
        r["lowest_is_l5"] = a.onepass and r.get("source") in LOWEST_IS_L5
    if a.fold is not None or a.source is not None:
        rows = [r for r, out in zip(rows, held_out(rows, a.fold, a.source), strict=True) if not out]
    out = Path(a.out) if a.out else ONEPASS_PATH if a.onepass else UNET_PATH
    base = a.base or (ONEPASS["base"] if a.onepass else BASE_CHANNELS)
    randomise = a.randomise if a.randomise is not None else ONEPASS["randomise"] if a.onepass else 0.0
    body_share = ONEPASS["body_share"] if a.onepass else 0.8
    t = time.time()
    real = [s for r in rows for s in cached_case_slices(r, a.cache)]
    with tempfile.TemporaryDirectory(prefix="modicscan-unet-") as tmp:
        ph_rows = phantom_rows(Path(tmp), a.phantoms) if a.phantoms else []
        for r in ph_rows:
            # The phantoms' sacrum below S1 is left unknown, as on the real scans: trained as background it taught
            # the net to drop the sacrum under the lowest body, and without a sacrum no level can be named.
            r["known_below_mm"] = 0.0
        phantom = [s for r in ph_rows for s in case_slices(r)]
    reader = []
    if a.l5_cases:
        from pipeline.evaluation.levels import fold_rows
        from pipeline.training.reader_l5 import read_l5_rows

        l5_rows = fold_rows(read_l5_rows(a.l5_cases, a.l5_reading), a.l5_fold, held_out=False)
        for r in l5_rows:
            got = cached_reader_slices(r, a.cache)
            reader += got
            if not got:
                print(f"{r['case']}: no segmented body at the reader's L5 (or none at all); left out", flush=True)
        print(f"{len(reader)} read L5 slices of {len(l5_rows)} cases", flush=True)
    print(f"{len(real)} real slices from {len(rows)} cases, {len(phantom)} phantom slices ({time.time() - t:.0f} s)", flush=True)
    net = fit(real, phantom, a.iters, a.seed, a.threads, rotate_deg=a.rotate_deg, scale_log=a.scale_log, base=base,
              randomise=randomise, body_share=body_share, outputs=ONEPASS["outputs"] if a.onepass else 1,
              single_slice=ONEPASS["single_slice"] if a.onepass else 0.0, reader=reader,
              reader_share=ONEPASS["reader_share"] if reader else 0.0)
    export_onnx(net, out)
    print(f"trained {a.iters} steps in {time.time() - t:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
