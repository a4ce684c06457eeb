"""Reranker CTR quality on MovieLens-100K: logistic regression, dense MLP and MoE in one code path.

    python benchmarks/ranker_quality.py --dataset ml-100k --json benchmarks/results/ranker_quality.json
    python benchmarks/ranker_quality.py --dataset criteo-sample    # or avazu-sample: smoke runs

Criteo and Avazu samples go through their feature spec (no id columns): the
spec is fitted on the sample's train file and applied to its dev (validation)
and test files; a few thousand rows are too few for quality claims.

Protocol (the published ML-100K CTR run): label = rating >= 4; features user
age/gender/occupation, item release year/genres, timestamp (standardised +
hour and weekday), user and item ids; one random 8:1:1 split over
interactions (seeded). Every encoder is fitted on train only
(:mod:`pipelines.ranker.data`). The three models differ only in
``RerankerConfig.kind``; each trains with early stopping on validation AUC
(the best epoch is kept) and is reported on test. The MoE's probabilities are
then temperature-scaled on validation (:func:`models.calibration.fit_calibration`);
``auc/gauc/logloss/ece`` are the calibrated MoE's test metrics,
``moe_ece_uncalibrated`` the ECE before. Published reference (logistic
regression, ML-100K): AUC 0.7765. Bar: MoE test AUC >= 0.79.

ML-100K defaults (``ML100K_DEFAULTS``; every flag overrides them): embedding
32, experts without hidden layers (each one linear map to 64 + ReLU), 8
experts with top-6 routing, the FM pairwise term on (dense too; never for
logistic regression), lr 3e-3, batch 1024, patience 2, no weight decay or
dropout. Chosen on the MEAN VALIDATION AUC over seeds 0, 1, 2 (three splits),
never on test, from about 40 runs (``--threads 1``, seconds on a loaded
2-core box):

    config (moe)                                   valid s0/s1/s2 (mean)        test s0/s1/s2 (mean)
    old defaults (emb 16, hidden 128, top-2)       .7930/.7799/.7928 (.7886)    .7803/.7875/.7863 (.7847)
    + linear experts + FM                          .7947/.7816/.7903 (.7889)    .7827/.7865/.7893 (.7862)
    + linear experts + FM + top-4                  .7944/.7840/.7970 (.7918)    .7868/.7886/.7893 (.7882)
    + ... + top-4 + embedding 32                   .7955/.7862/.7959 (.7925)    .7855/.7917/.7950 (.7907)
    + ... + top-6 + embedding 32  (the default)    .7961/.7878/.7992 (.7944)    .7848/.7929/.7958 (.7912)
    + ... + top-8 + embedding 32                   .7951/.7866/.8002 (.7940)    .7871/.7934/.7951 (.7919)
    + ... + top-6 + embedding 32, lr 2e-3, pat. 3  .7959/.7855/.7993 (.7936)    .7853/.7920/.7977 (.7917)

No change of encoding helped on validation (seed 0, MoE): RecBole's exact
fields (age and year as tokens only, timestamp as one number) .7899; + week
or day of the timestamp as a token .7866-.7917; age in 5-year bands and
pre-1960 years by decade .7920; against .7930 for the encoding used here.
Neither did L2 on the looked-up embedding rows (1e-4..1e-2: .7908-.7933),
AdamW decay on dense embeddings (.7863-.7926), dropout 0.2 (.7923), batch
256/512/2048 (.7907-.7929), lr 1e-3 (.7928), 4 or 16 experts (.7915, .7931),
hidden (256, 128) (.7927), no gate noise (.7903), no load-balancing (.7927).

Second task (the default on ML-100K, ``--second-task rating``): the dense and
MoE models also regress the 1-5 rating that the label thresholds, with their
own gate and head (MMoE; loss weight 0.5, ``models.ranker.second_task``);
logistic regression stays click-only, the published baseline. The rating is a
training target of the training rows only, never an input, so the features
and the protocol are the published ones. It lifts validation AUC on every
seed (MoE mean .7944 -> .7998; weight 1.0 on seed 0: valid .8016, test
.7917) and test with it:

    seed   lr               dense            moe              moe - dense
    0      .7710 (.7829)    .7899 (.7992)    .7924 (.8017)    +.0025
    1      .7763 (.7725)    .7978 (.7917)    .7945 (.7927)    -.0033
    2      .7856 (.7801)    .7962 (.7993)    .7995 (.8050)    +.0033
    mean   .7776            .7946            .7955            +.0008

The MoE meets the 0.79 bar on every seed with it. Click only
(``--second-task none``), the figures below.

Measured click only (``--threads 1 --seed S --second-task none``; test AUC,
valid AUC in brackets; the MoE's AUC is the same after temperature scaling):

    seed   lr               dense            moe              moe - dense
    0      .7710 (.7829)    .7849 (.7951)    .7848 (.7961)    -.0001
    1      .7763 (.7725)    .7908 (.7842)    .7929 (.7878)    +.0021
    2      .7856 (.7801)    .7927 (.7941)    .7958 (.7992)    +.0031
    mean   .7776            .7895            .7912            +.0017

The dense baseline takes the same embedding, FM term and active-parameter
budget, so it gains too (seed 0 .7833 -> .7849). Noise: three training seeds
on split 0 gave valid .7924-.7930 (old defaults), the split moves test AUC
far more (MoE .7848-.7958). Seed 0's test part is the hardest of the three
for every model (its valid AUC runs about .011 above its test AUC): logistic
regression averages .7776 over seeds 0-2, matching the published 0.7765, so
our encoding loses nothing measurable. The seed-0 MoE test AUC (.7848) stays
below the 0.79 bar with every configuration tried; seeds 1 and 2 pass it and
the 3-seed mean is .7912.

Criteo/Avazu samples keep the platform's ``models.ranker`` defaults (no
ML-100K tuning on them).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import time

import torch

from features.sources.ctr import apply_ctr, load_ctr
from infra.config import CtrSourceConfig, RankerConfig, SecondTaskConfig
from models.calibration import fit_calibration
from models.ctr_metrics import ctr_report
from models.moe import KINDS, Reranker, active_parameters
from pipelines.ranker.data import RankerData, movielens_ctr_data
from pipelines.ranker.loop import configs_from, evaluate, train_epochs
from pipelines.ranker.spec_data import ranker_data_from_parts
from serving.scoring import predict

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SUPPORTED = ("ml-100k", "criteo-sample", "avazu-sample")
PUBLISHED_LR_AUC = 0.7765
BAR_MOE_AUC = 0.79
# The ML-100K defaults, chosen on mean validation AUC over seeds 0-2 (module
# doc), pinned in full so the figures there do not drift with the platform's
# defaults; other datasets take the platform's models.ranker defaults.
ML100K_DEFAULTS: dict[str, object] = {
    "embedding_dim": 32,
    "expert_hidden": (),
    "expert_dim": 64,
    "n_experts": 8,
    "top_k": 6,
    "field_interactions": True,
    "dropout": 0.0,
    "epochs": 20,
    "patience": 2,
    "batch_size": 1024,
    "lr": 3e-3,
    "weight_decay": 0.0,
}
# Benchmark flags named differently from their models.ranker field.
FIELD_OF_FLAG = {"lr": "learning_rate"}
# Short names in the JSON keys (lr_auc, dense_auc, moe_auc).
PREFIX = {"logistic": "lr", "dense": "dense", "moe": "moe"}


def ctr_sample_data(folder: Path, dataset: str) -> RankerData:
    """A Criteo/Avazu sample folder through its feature spec: fitted on the train file,
    applied to the dev (validation) and test files; no id columns, no GAUC."""
    kind = "criteo" if dataset.startswith("criteo") else "avazu"
    train = load_ctr(CtrSourceConfig(kind=kind, path=str(folder)))

    def split_file(name: str) -> Path:
        found = sorted(
            p for p in folder.iterdir() if name in p.name and p.suffix in (".tsv", ".csv")
        )
        if not found:
            raise FileNotFoundError(f"{folder}: no *{name}* file")
        return found[0]

    valid = apply_ctr(split_file("dev"), kind, train.spec)
    test = apply_ctr(split_file("test"), kind, train.spec)
    return ranker_data_from_parts(train.table, valid.table, test.table, train.spec)


def parameter_count(model: Reranker) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(
    kind: str, data: RankerData, args: argparse.Namespace
) -> tuple[dict[str, object], Reranker]:
    # The benchmark's flags over the platform's `models.ranker` defaults, mapped
    # to the model and loop configs as every pipeline maps them.
    config, train = configs_from(
        RankerConfig(
            kind=kind,  # type: ignore[arg-type]
            embedding_dim=args.embedding_dim,
            n_experts=args.n_experts,
            top_k=args.top_k,
            expert_hidden=args.expert_hidden,
            expert_dim=args.expert_dim,
            dropout=args.dropout,
            field_interactions=args.field_interactions,
            epochs=args.epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            # Logistic regression stays the published click-only baseline.
            second_task=(
                SecondTaskConfig(weight=args.second_task_weight)
                if args.second_task == "rating" and kind != "logistic"
                else None
            ),
        ),
        data.train,
    )
    result = train_epochs(config, train, data)
    test = evaluate(result.model, data.test)
    row: dict[str, object] = {
        "auc": test["auc"],
        "gauc": test["gauc"],
        "logloss": test["logloss"],
        "ece": test["ece"],
        "valid_auc": result.best_valid_auc,
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "seconds": round(result.seconds, 2),
        "parameters": parameter_count(result.model),
        "active_parameters": active_parameters(result.model),
        "history": result.history,
    }
    return row, result.model


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: shared/datasets/NAME")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    # Unset flags take the dataset's defaults: ML100K_DEFAULTS, else the platform's models.ranker.
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument(
        "--field-interactions",
        action=argparse.BooleanOptionalAction,
        help="FM pairwise term beside the dense and MoE bodies",
    )
    parser.add_argument("--embedding-dim", type=int)
    parser.add_argument("--n-experts", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument(
        "--expert-hidden",
        type=lambda text: tuple(int(w) for w in text.split(",") if w.strip()),
        help="hidden widths of each expert, comma-separated; '' = none",
    )
    parser.add_argument("--expert-dim", type=int)
    parser.add_argument("--dropout", type=float)
    parser.add_argument(
        "--second-task",
        choices=("none", "rating"),
        help="rating: the dense and MoE models also regress the 1-5 rating (own gate and "
        "head); default rating on ml-100k, none on the CTR samples (they have no rating)",
    )
    parser.add_argument("--second-task-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.dataset not in SUPPORTED:
        parser.error(
            f"--dataset {args.dataset!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    platform = RankerConfig()
    dataset_defaults = ML100K_DEFAULTS if args.dataset == "ml-100k" else {}
    for name in ML100K_DEFAULTS:
        if getattr(args, name) is None:
            fallback = getattr(platform, FIELD_OF_FLAG.get(name, name))
            setattr(args, name, dataset_defaults.get(name, fallback))
    if args.second_task is None:
        args.second_task = "rating" if args.dataset == "ml-100k" else "none"
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folder = args.data_dir or DATASETS / args.dataset
    if args.dataset == "ml-100k":
        data = movielens_ctr_data(folder, args.seed)
    else:
        data = ctr_sample_data(folder, args.dataset)

    rows: dict[str, dict[str, object]] = {}
    models: dict[str, Reranker] = {}
    for kind in KINDS[::-1]:  # logistic, dense, moe
        rows[kind], models[kind] = run_model(kind, data, args)

    # Temperature scaling of the MoE, fitted on validation logits, applied to test.
    moe = models["moe"]
    calibrator = fit_calibration("temperature", predict(moe, data.valid), data.valid.labels)
    test_logits = predict(moe, data.test)
    calibrated = ctr_report(
        data.test.labels.numpy(),
        calibrator.transform(test_logits),
        users=data.test.users.numpy() if data.test.users is not None else None,
    )

    results: dict[str, object] = {
        "dataset": args.dataset,
        "seed": args.seed,
        "n_train": len(data.train),
        "n_valid": len(data.valid),
        "n_test": len(data.test),
        "test_positive_rate": calibrated["positive_rate"],
        "auc": calibrated["auc"],
        "gauc": calibrated["gauc"],
        "logloss": calibrated["logloss"],
        "ece": calibrated["ece"],
        "moe_ece_uncalibrated": rows["moe"]["ece"],
        "moe_logloss_uncalibrated": rows["moe"]["logloss"],
        "temperature": calibrator.temperature,
        "published_lr_auc": PUBLISHED_LR_AUC,
        "bar_moe_auc": BAR_MOE_AUC,
    }
    for kind, row in rows.items():
        prefix = PREFIX[kind]
        for key in ("auc", "gauc", "logloss", "ece", "valid_auc", "best_epoch", "epochs",
                    "seconds", "parameters", "active_parameters"):  # fmt: skip
            results[f"{prefix}_{key}"] = row[key]
    results["moe_meets_bar"] = bool(results["moe_auc"] >= BAR_MOE_AUC)  # type: ignore[operator]
    results["moe_vs_dense_auc"] = rows["moe"]["auc"] - rows["dense"]["auc"]  # type: ignore[operator]
    results["moe_vs_lr_auc"] = rows["moe"]["auc"] - rows["logistic"]["auc"]  # type: ignore[operator]
    results["config"] = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "patience",
            "batch_size",
            "lr",
            "weight_decay",
            "embedding_dim",
            "n_experts",
            "top_k",
            "expert_hidden",
            "expert_dim",
            "field_interactions",
            "dropout",
            "second_task",
            "second_task_weight",
            "threads",
        )
    }
    results["history"] = {PREFIX[k]: row["history"] for k, row in rows.items()}
    results["wall_s"] = round(time.perf_counter() - start, 1)

    print(
        f"{args.dataset}: train {len(data.train)}, valid {len(data.valid)}, test {len(data.test)}, "
        f"test positive rate {calibrated['positive_rate']:.3f}"
    )
    header = (
        f"{'model':<10}{'auc':>8}{'gauc':>8}{'logloss':>9}{'ece':>8}{'v_auc':>8}"
        f"{'best/ep':>9}{'sec':>8}{'params':>10}{'active':>9}"
    )
    print(header)
    for kind, row in rows.items():
        print(
            f"{PREFIX[kind]:<10}{row['auc']:>8.4f}{row['gauc']:>8.4f}{row['logloss']:>9.4f}"
            f"{row['ece']:>8.4f}{row['valid_auc']:>8.4f}"
            f"{str(row['best_epoch']) + '/' + str(row['epochs']):>9}{row['seconds']:>8.1f}"
            f"{row['parameters']:>10}{row['active_parameters']:>9}"
        )
    print(
        f"moe + temperature (T={calibrator.temperature:.3f}): auc {calibrated['auc']:.4f} "
        f"logloss {calibrated['logloss']:.4f} ece {calibrated['ece']:.4f} "
        f"(before {rows['moe']['ece']:.4f})"
    )
    if args.dataset == "ml-100k":
        print(
            f"bar: moe auc {results['moe_auc']:.4f} >= {BAR_MOE_AUC}: {results['moe_meets_bar']}; "
            f"published LR {PUBLISHED_LR_AUC}; wall {results['wall_s']} s"
        )
    else:
        print(
            f"smoke run: a sample this small supports no quality claim; wall {results['wall_s']} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
