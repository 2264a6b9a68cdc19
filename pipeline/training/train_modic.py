"""Train the per-disc Modic presence models shipped as ``pipeline/models/disc_modic.joblib`` (features measured on
the cascade's bodies: ``--config`` with ``segmentation: body_model: unet``) and ``disc_modic_onepass.joblib`` (the
one-pass net's bodies: the default ``auto`` on SPIDER's single slices, or ``body_model: onepass``)
(``python -m pipeline.training.train_modic [--config C]``).

Training data: the SPIDER patients of ``../shared/data/modic-spider/`` (van der Graaf et al., Sci Data 2024;11:264;
one mid-sagittal T1 + T2 slice each, per-disc Modic gradings). Every case goes through the real stages after
loading (``batch.study.analyse_volumes``: segmentation, measurement, threshold classification); discs are counted
from the bottom as the readers count them (``disc_model.discs_anchor``) and each graded disc we found gives one row
of ``disc_model.disc_features`` (label: Modic change present, type 1-3). Per-case rows are cached (``--cache``), so a
second run only refits.

Model: logistic regression (impute median, standardise, L2 with ``--C``, balanced classes). The decision threshold
maximises balanced accuracy on grouped out-of-fold predictions of the training data, never on the data it is
scored on. ``--repeats R`` first prints a cross-validation estimate over patients (5 folds grouped by patient,
R shuffles; the threshold chosen inside each training split by an inner grouped 4-fold CV) beside the threshold
rules scored on the same discs, for the graded discs we found and for all graded discs (a disc not found counts as
"no change", as in ``modicscan evaluate-findings``). The final model is fitted on all rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.classify import disc_endplates, disc_type_fractions
from pipeline.config import Config
from pipeline.disc_cnn import PATCH_MM, PATCH_VERSION, disc_patches
from pipeline.disc_model import disc_features, discs_anchor, feature_names, model_path
from pipeline.evaluation.findings import TYPE_CODE, presence_metrics, read_cases, read_grading_rows
from pipeline.training.train_disc_cnn import AUX_GRADINGS, aux_targets, fold_ids

DATA = Path("../shared/data/modic-spider")
FOLDS = 5


def case_rows(row: dict, cfg: Config) -> dict:
    """Features, threshold calls and ivd of every disc above the count's anchor in one case ({} on failure)."""
    from pipeline.batch.study import analyse_volumes
    from pipeline.errors import StudyError
    from pipeline.io.nifti_study import load_nifti_study

    try:
        an = analyse_volumes(load_nifti_study(row["paths"]), cfg)
    except StudyError as exc:
        return {"case": row["case"], "error": exc.code}
    meas = an.measurements
    anchor = discs_anchor(meas.levels)
    x = disc_features(meas)
    keep = [a for a in range(len(meas.discs)) if anchor - a >= 1]
    by_level = {v["level"]: v for v in an.findings.vertebrae}
    dominant = []
    for a in keep:
        eps = disc_endplates(an.findings.discs[a], by_level)
        fr = disc_type_fractions(eps, cfg.classification.diffuse_edema_volume_pct)[1:]
        dominant.append(int(np.argmax(fr)) + 1 if fr.max() > 0 else 2)
    images = {role: vol.data for role, vol in an.volumes.items()}
    patches = disc_patches(images, an.segmentation.labels, [int(v) for v in meas.values], meas.spacing, meas.reference)
    return {"case": row["case"], "body_model": an.body_model,
            "x": x[keep], "ivd": np.array([anchor - a for a in keep], dtype=int),
            # half precision: ~5e-4 relative, far under the training's intensity noise (0.03); a quarter of the disk
            "patches": patches[keep].astype(np.float16), "patch_version": (PATCH_VERSION, PATCH_MM),
            "thr_code": np.array([TYPE_CODE[an.findings.discs[a]["modic"]["modic_type"]] for a in keep], dtype=int),
            "thr_score": np.array([an.findings.discs[a]["modic"]["score"] for a in keep], dtype=float),
            "dominant": np.array(dominant, dtype=int)}


def config_fingerprint(cfg: Config) -> str:
    """What a cached row depends on besides the case: the whole config (the features change with the body model,
    the measurement zones, ...), as canonical JSON."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _extract(row, cfg, cache: Path | None) -> dict:
    import hashlib
    import pickle

    # one file per case and config: rows measured under two body models live side by side in one folder
    tag = hashlib.sha1(config_fingerprint(cfg).encode()).hexdigest()[:10]
    path = cache / f"{row['case']}_{tag}.pkl" if cache else None
    if path is not None and path.is_file():
        with open(path, "rb") as fh:
            rec = pickle.load(fh)
        # a row measured under another config (another body model) is measured again, not silently mixed in
        if (rec.get("features") == feature_names() and rec.get("config") == config_fingerprint(cfg)
                and (rec.get("patch_version") == (PATCH_VERSION, PATCH_MM) or "x" not in rec)):
            return rec
    rec = case_rows(row, cfg)
    rec["features"] = feature_names()
    rec["config"] = config_fingerprint(cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(rec, fh)
    return rec


def trained_body_model(recs: list[dict], configured: str) -> str:
    """The one body model whose outlines the features were measured on (``auto`` resolves per case: the one-pass
    net for single slices such as SPIDER's, the U-Net for volumes). A disc model is trained on one body model's
    features only: cases measured under both stop the training."""
    models = {rec.get("body_model") or configured for rec in recs if "x" in rec}
    if len(models) > 1:
        raise SystemExit(f"the cases were segmented by different body models ({', '.join(sorted(models))}: "
                         "segmentation.body_model auto); pass --config with one body_model")
    model = models.pop() if models else configured
    if model == "auto":  # no case was measured (or only rows cached before the field): the model is unknown
        raise SystemExit("which body model measured the features is unknown; pass --config with one body_model")
    return model


def make_model(c: float):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                         LogisticRegression(C=c, class_weight="balanced", max_iter=5000))


def oof_regression(x, y, groups, c: float, seed: int = 0) -> np.ndarray:
    """Grouped out-of-fold (4-fold, the split of ``fold_ids(groups, 4, seed)``) probabilities of the regression."""
    fid = fold_ids(groups, 4, seed)
    p = np.zeros(len(y))
    for k in range(4):
        tr = fid != k
        p[~tr] = make_model(c).fit(x[tr], y[tr]).predict_proba(x[~tr])[:, 1]
    return p


def best_threshold(y, p) -> float:
    """The cut of ``p`` (among its 5-95 % quantiles) with the highest balanced accuracy on ``y``."""
    from sklearn.metrics import balanced_accuracy_score

    candidates = np.quantile(p, np.linspace(0.05, 0.95, 91))
    return float(candidates[int(np.argmax([balanced_accuracy_score(y, p >= t) for t in candidates]))])


def choose_threshold(x, y, groups, c: float, seed: int = 0) -> float:
    """Threshold maximising balanced accuracy on grouped out-of-fold (4-fold) probabilities of (x, y)."""
    return best_threshold(y, oof_regression(x, y, groups, c, seed))


def cross_validate(x, y, groups, c: float, repeats: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per repeat: out-of-fold probability and presence call (threshold from the training folds only)."""
    out = []
    for rep in range(repeats):
        fid = fold_ids(groups, FOLDS, 100 + rep)
        p = np.zeros(len(y))
        call = np.zeros(len(y), dtype=int)
        for k in range(FOLDS):
            tr, te = fid != k, fid == k
            t = choose_threshold(x[tr], y[tr], groups[tr], c, seed=rep)
            p[te] = make_model(c).fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
            call[te] = p[te] >= t
        out.append((p, call))
    return out


def cross_validate_with_cnn(x, patches, y, groups, c: float, repeats: int, epochs: int, aux: np.ndarray | None = None):
    """As :func:`cross_validate` for the mean of the regression's and the CNN's probabilities: inside each outer
    training split, the 4 grouped CNNs (``train_disc_cnn.grouped_nets``) and the regression's out-of-fold
    probabilities on the same folds choose the threshold; the outer test rows get the regression fitted on the
    whole training split and the mean of the 4 CNNs (the shipped procedure, ``DiscModel.decide``: a disc without a
    patch is left out of the CNN's training and scored by the regression alone at its own threshold). Also
    returns the CNN's own test probabilities (NaN without a patch). ``aux``: the readers' other gradings per disc,
    learnt beside Modic by the CNNs (``train_disc_cnn.aux_targets``; training rows only, never read at test)."""
    from pipeline.disc_cnn import patch_valid

    valid = patch_valid(patches)
    out, cnn_only = [], []
    for rep in range(repeats):
        fid = fold_ids(groups, FOLDS, 100 + rep)
        p, p_cnn, call = np.zeros(len(y)), np.full(len(y), np.nan), np.zeros(len(y), dtype=int)
        for k in range(FOLDS):
            tr, te = fid != k, fid == k
            fitted = fit_with_cnn(x[tr], patches[tr], y[tr], groups[tr], c, seed=rep, epochs=epochs,
                                  aux=None if aux is None else aux[tr])
            p[te], p_cnn[te & valid], threshold = fitted.decide(x[te], patches[te])
            call[te] = p[te] >= threshold
            print(f"  CNN CV repeat {rep} fold {k}: {time.process_time():.0f} s CPU", flush=True)
        out.append((p, call))
        cnn_only.append(p_cnn)
    return out, cnn_only


class FittedWithCnn:
    """The regression, its threshold, the grouped CNNs and the threshold of the mean, fitted on one training set;
    ``decide`` scores like ``disc_model.DiscModel.decide`` with the nets in torch."""

    def __init__(self, estimator, t_regression: float, nets, t_both: float, oof_cnn: np.ndarray):
        self.estimator, self.t_regression, self.nets, self.t_both = estimator, t_regression, nets, t_both
        self.oof_cnn = oof_cnn

    def decide(self, x, patches):
        from pipeline.disc_cnn import patch_valid
        from pipeline.training.train_disc_cnn import predict

        p = self.estimator.predict_proba(x)[:, 1]
        ok = patch_valid(patches)
        p_cnn = predict(self.nets, patches[ok]) if ok.any() else np.zeros(0)
        p[ok] = (p[ok] + p_cnn) / 2
        return p, p_cnn, np.where(ok, self.t_both, self.t_regression)


def fit_with_cnn(x, patches, y, groups, c: float, seed: int, epochs: int, aux: np.ndarray | None = None
                 ) -> FittedWithCnn:
    """Fit the shipped procedure on (x, patches, y): grouped out-of-fold regression and CNN probabilities (the
    same 4 folds by patient) choose the two thresholds; the regression is refitted on all rows; the 4 fold nets
    are the CNN (``aux``: auxiliary gradings they also learn). Discs without a patch train the regression only."""
    from pipeline.disc_cnn import patch_valid
    from pipeline.training.train_disc_cnn import grouped_nets

    ok = patch_valid(patches)
    oof_reg = oof_regression(x, y, groups, c, seed=seed)
    nets, oof_cnn = grouped_nets(patches[ok], y[ok], groups[ok], seed=seed, epochs=epochs,
                                 aux=None if aux is None else aux[ok])
    return FittedWithCnn(make_model(c).fit(x, y), best_threshold(y, oof_reg), nets,
                         best_threshold(y[ok], (oof_reg[ok] + oof_cnn) / 2), oof_cnn)


def _metrics(truth, call, score, type_pred, missing: np.ndarray) -> dict:
    """Presence metrics on the found discs and on all graded discs (``missing``: truth of the graded discs not
    found, counted as "no change" with score 0); type kappa on all graded discs."""
    from sklearn.metrics import cohen_kappa_score

    zeros = np.zeros(missing.size, dtype=int)
    t_all = np.concatenate([truth, missing])
    return {"found": presence_metrics((truth > 0).astype(int), call, score),
            "all_graded": presence_metrics((t_all > 0).astype(int), np.concatenate([call, zeros]),
                                           np.concatenate([score, zeros.astype(float)])),
            "type_kappa_all_graded": round(float(cohen_kappa_score(t_all, np.concatenate([type_pred, zeros]))), 4)}


def _summarise(name: str, runs: list[dict], repeats: int, thresholds: dict) -> dict:
    """Per-repeat metrics -> lists per metric (and printed means beside the threshold rules)."""
    cv = {part: {k: [r[part][k] for r in runs] for k in runs[0][part]} for part in ("found", "all_graded")}
    cv["type_kappa_all_graded"] = [r["type_kappa_all_graded"] for r in runs]
    keys = ("balanced_accuracy", "kappa", "sensitivity", "specificity", "auc_score")
    for part in ("found", "all_graded"):
        print(f"{part:>10}: {name} CV (5-fold over patients x {repeats}) "
              + " ".join(f"{k} {np.mean(cv[part][k]):.3f}±{np.std(cv[part][k]):.3f}" for k in keys)
              + " | thresholds " + " ".join(f"{k} {thresholds[part][k]:.3f}" for k in keys))
    print(f"type kappa (all graded): {name} CV {np.mean(cv['type_kappa_all_graded']):.3f}, "
          f"thresholds {thresholds['type_kappa_all_graded']:.3f}")
    return cv


def _means(cv: dict | None) -> dict | None:
    if cv is None:
        return None
    return {part: {k: round(float(np.mean(v)), 4) for k, v in cv[part].items() if k != "confusion_matrix"}
            for part in ("found", "all_graded")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.training.train_modic", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=DATA / "cases.csv")
    ap.add_argument("--gradings", type=Path, default=DATA / "gradings.csv")
    ap.add_argument("--cache", type=Path, default=None, help="folder for per-case feature rows (reused when present)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--C", type=float, default=0.01, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--repeats", type=int, default=5, help="cross-validation shuffles (0: no CV estimate)")
    ap.add_argument("--out", type=Path, default=None, help="where to save the model (default: the shipped model "
                                                          "of the config's body model, disc_model.model_path)")
    ap.add_argument("--no-save", action="store_true", help="only print the cross-validation estimate")
    ap.add_argument("--config", type=Path, help="YAML config the features are measured with (e.g. another "
                                                "segmentation.body_model; default: the package's defaults)")
    ap.add_argument("--cnn", action="store_true", help="also train the disc CNN on T1 / T2 disc patches "
                                                       "(train_disc_cnn.py; needs torch) and ship it with the model")
    ap.add_argument("--cnn-repeats", type=int, default=0, help="shuffles of the nested CV estimate of regression + "
                                                               "CNN (each: 20 CNNs, ~12 min of one core)")
    ap.add_argument("--epochs", type=int, default=None, help="CNN epochs (default train_disc_cnn.EPOCHS)")
    ap.add_argument("--no-aux", action="store_true", help="the CNN learns Modic alone, not also the gradings' "
                                                         "other columns (train_disc_cnn.AUX_GRADINGS)")
    args = ap.parse_args(argv)
    import joblib
    import sklearn
    from sklearn.metrics import roc_auc_score

    from pipeline.training.train_disc_cnn import EPOCHS

    args.epochs = args.epochs or EPOCHS
    if args.cnn_repeats and not args.cnn:
        ap.error("--cnn-repeats needs --cnn")
    if args.cnn:
        try:
            import torch  # noqa: F401
        except ImportError:
            ap.error("--cnn trains a net: install PyTorch first (pip install -e '.[train]')")

    start = time.perf_counter()
    if args.config is not None:
        from pipeline.config import load_config
        from pipeline.errors import ConfigError

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            ap.error(str(exc))
    else:
        cfg = Config()
    cfg.classification.disc_model = "thresholds"  # the features do not depend on it; never needs the old model
    rows = read_cases(args.cases)
    grading_table = read_grading_rows(args.gradings)
    truth = {key: int(r["modic"]) for key, r in grading_table.items()}
    other_gradings = {} if args.no_aux else grading_table
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            recs = list(pool.map(_extract, rows, [cfg] * len(rows), [args.cache] * len(rows)))
    else:
        recs = [_extract(r, cfg, args.cache) for r in rows]
    t_extract = time.perf_counter() - start
    xs, types, groups, thr_code, thr_score, dominant, patch_rows, aux_rows = [], [], [], [], [], [], [], []
    found = set()
    for rec in recs:
        if "x" not in rec:
            continue
        for i, ivd in enumerate(rec["ivd"]):
            key = (rec["case"], int(ivd))
            if key not in truth:
                continue
            found.add(key)
            xs.append(rec["x"][i])
            types.append(truth[key])
            groups.append(rec["case"])
            thr_code.append(rec["thr_code"][i])
            thr_score.append(rec["thr_score"][i])
            dominant.append(rec["dominant"][i])
            patch_rows.append(rec["patches"][i])
            aux_rows.append(other_gradings.get(key, {}))
    body_model = trained_body_model(recs, cfg.segmentation.body_model)
    x, t = np.array(xs), np.array(types)
    patches = np.array(patch_rows, dtype=np.float32)
    y, g = (t > 0).astype(int), np.array(groups)
    aux = aux_targets(aux_rows) if other_gradings else None
    if aux is not None and not np.isfinite(aux).any():
        aux = None  # the gradings have none of the auxiliary columns: Modic alone
    thr_code, thr_score, dominant = np.array(thr_code), np.array(thr_score), np.array(dominant)
    cases_in = {r["case"] for r in rows}
    missing = np.array([v for k, v in truth.items() if k[0] in cases_in and k not in found], dtype=int)
    print(f"{len(rows)} cases ({sum('x' not in r for r in recs)} failed), {len(y)} graded discs found "
          f"({y.sum()} with a change), {missing.size} graded discs not found; features {t_extract:.0f} s")
    report = {"n_cases": len(rows), "n_discs": int(len(y)), "n_positive": int(y.sum()), "n_missing": int(missing.size),
              "C": args.C, "features": x.shape[1]}
    thr_type = np.where(thr_code > 0, thr_code, 0)
    report["thresholds"] = _metrics(t, (thr_code > 0).astype(int), thr_score, thr_type, missing)
    def model_types(call):
        return np.where(call == 1, np.where(thr_code > 0, thr_code, dominant), 0)

    if args.repeats:
        t0 = time.perf_counter()
        runs = [_metrics(t, call, p, model_types(call), missing) for p, call in cross_validate(x, y, g, args.C,
                                                                                                args.repeats)]
        report["cv"] = _summarise("regression", runs, args.repeats, report["thresholds"])
        report["cv_seconds"] = round(time.perf_counter() - t0, 1)
    if args.cnn and args.cnn_repeats:
        t0 = time.process_time()
        both, cnn_only = cross_validate_with_cnn(x, patches, y, g, args.C, args.cnn_repeats, args.epochs, aux=aux)
        runs = [_metrics(t, call, p, model_types(call), missing) for p, call in both]
        report["cv_with_cnn"] = _summarise("regression + CNN", runs, args.cnn_repeats, report["thresholds"])
        report["cv_cnn_alone_auc_found"] = [round(float(roc_auc_score(y[np.isfinite(pc)], pc[np.isfinite(pc)])), 4)
                                            for pc in cnn_only]
        report["cv_with_cnn_cpu_seconds"] = round(time.process_time() - t0, 1)
        print(f"CNN alone, found discs: AUC {np.mean(report['cv_cnn_alone_auc_found']):.3f}; nested CV "
              f"{report['cv_with_cnn_cpu_seconds']:.0f} s CPU")
    if not args.no_save:
        t0 = time.perf_counter()
        threshold = choose_threshold(x, y, g, args.C)
        estimator = make_model(args.C).fit(x, y)
        out = args.out or model_path(body_model)
        bundle = {"estimator": estimator, "threshold": threshold, "features": feature_names(),
                  "trained_on": f"SPIDER modic-spider: {len(set(g))} patients, {len(y)} graded discs",
                  "sklearn": sklearn.__version__, "C": args.C, "body_model": body_model,
                  "cv": _means(report.get("cv"))}
        if args.cnn:
            from pipeline.disc_cnn import patch_valid
            from pipeline.training.train_disc_cnn import export_onnx

            fitted = fit_with_cnn(x, patches, y, g, args.C, seed=0, epochs=args.epochs, aux=aux)
            cnn_file = out.with_name(out.stem + "_cnn.onnx")
            export_onnx(fitted.nets, cnn_file)
            both = fitted.t_both
            bundle["cnn"] = {"file": cnn_file.name, "threshold": both, "epochs": args.epochs,
                             "aux_gradings": [] if aux is None else [col for col, _, _ in AUX_GRADINGS],
                             "oof_auc_found": round(float(roc_auc_score(y[patch_valid(patches)], fitted.oof_cnn)), 4),
                             "cv": _means(report.get("cv_with_cnn"))}
            print(f"saved {cnn_file} (CNN out-of-fold AUC {bundle['cnn']['oof_auc_found']:.3f}, threshold of the "
                  f"mean {both:.3f})")
        out.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(bundle, out, compress=3)
        print(f"saved {out} (threshold {threshold:.3f}, fit {time.perf_counter() - t0:.1f} s)")
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("cv",)}, default=float)[:2000])
    print(f"total {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
