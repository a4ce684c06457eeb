"""Criteo and Avazu click logs -> a generic labelled feature table + its spec.

File layouts (Kaggle releases and the samples cut from them):

- **Criteo** (display advertising challenge): one example per line,
  ``label, I1..I13, C1..C26``; tab-separated without a header in the Kaggle
  files, comma-separated with that header in DeepCTR's ``criteo_sample.txt``.
  ``I*`` are integer counts (may be empty or negative, ``-1``/``-2`` occur;
  some copies write ``260.0``); ``C*`` are 8-hex-digit hashed categoricals
  (may be empty). The Kaggle ``test.txt`` has no label column (39 fields).
- **Avazu** (CTR prediction): CSV, ``id, click, hour, C1, banner_pos,
  site_id, site_domain, site_category, app_id, app_domain, app_category,
  device_id, device_ip, device_model, device_type, device_conn_type,
  C14..C21``; a header row in ``train.csv`` but not in every split copy;
  ``hour`` is ``YYMMDDHH`` (UTC); ``test.csv`` has no ``click`` column.

Encoding, recorded in the :class:`~features.feature_spec.FeatureSpec`:

- categoricals get a **vocabulary** fit on the training file: values seen at
  least ``min_category_count`` times, most frequent first (ties by value);
  code ``i + 1`` for vocabulary entry ``i``, code 0 for rare or unseen values
  (out-of-vocabulary). A missing value is the category ``""`` (missingness
  carries signal in both datasets), coded like any other value. Vocabularies,
  not hash buckets, so a code can be read back and drift checks can name the
  values; at full Criteo scale ``min_category_count`` bounds their size.
- Criteo ``I*`` are numeric with ``log1p`` normalisation (``sign(x) *
  log1p(|x|)``, applied by the consumer); the table holds the raw value as
  float64 with **missing values filled with 0** (the count convention used by
  the Criteo baselines), and the spec's mean/std/min/max are measured on the
  non-missing training values.
- Avazu ``hour`` becomes ``hour_of_day`` (0-23) and ``weekday`` (0 = Monday)
  context categoricals with fixed full vocabularies; ``id`` is dropped (unique
  per row); every other column is categorical.

The output table is ``label`` (float 0/1, null only for unlabelled test
files) followed by one column per feature in spec order: int64 codes for
categoricals, float64 for numerics. Fit with :func:`load_ctr` (or
:func:`fit_ctr_spec`) on train, apply to dev/test with :func:`apply_ctr` so all
splits share codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from features.dataset import CtrTable
from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from features.sources.text import local_path, utf8_bytes
from infra.config import CtrSourceConfig
from infra.errors import SourceError

CtrDataset = Literal["criteo", "avazu"]

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL)
AVAZU_COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
AVAZU_CATEGORICAL = AVAZU_COLUMNS[3:]
AVAZU_CONTEXT = {"hour_of_day": tuple(str(h) for h in range(24)), "weekday": tuple("0123456")}
_DATA_SUFFIXES = (".txt", ".tsv", ".csv")
_NOT_DATA = ("readme", "provenance", "license")


def load_ctr(config: CtrSourceConfig) -> CtrTable:
    """Read ``config.path`` (its train file(s) for a folder), fit the spec, encode."""
    raw = read_ctr_raw(config.path, config.kind, prefer_train=True)
    spec = fit_ctr_spec(raw, config.kind, config.min_category_count)
    return CtrTable(name=_name(config.path, config.kind), table=encode_ctr(raw, spec), spec=spec)


def apply_ctr(path: str | Path, dataset: CtrDataset, spec: FeatureSpec) -> CtrTable:
    """Encode another split (dev/test) with a spec fit on train: codes are shared."""
    raw = read_ctr_raw(path, dataset, prefer_train=False)
    return CtrTable(name=_name(path, dataset), table=encode_ctr(raw, spec), spec=spec)


def read_ctr_raw(path: str | Path, dataset: CtrDataset, prefer_train: bool = False) -> pl.DataFrame:
    """``label`` (float) + raw string feature columns from a file or a folder of files.

    In a folder, files named ``*train*`` are read when ``prefer_train`` and
    such files exist; otherwise every data file (``.txt/.tsv/.csv``).
    """
    readers = {"criteo": _read_criteo_file, "avazu": _read_avazu_file}
    files = data_files(local_path(path), prefer_train)
    return pl.concat([readers[dataset](f) for f in files], how="vertical")


def data_files(path: Path, prefer_train: bool) -> list[Path]:
    if path.is_file():
        return [path]
    files = [
        f
        for f in sorted(path.iterdir())
        if f.is_file() and f.suffix in _DATA_SUFFIXES and not f.name.lower().startswith(_NOT_DATA)
    ]
    train = [f for f in files if "train" in f.name.lower()]
    chosen = train if prefer_train and train else files
    if not chosen:
        raise SourceError(f"{path}: no data files ({', '.join(_DATA_SUFFIXES)}) in the folder")
    return chosen


def fit_ctr_spec(
    raw: pl.DataFrame, dataset: CtrDataset, min_category_count: int = 2
) -> FeatureSpec:
    """Vocabularies and numeric statistics measured on ``raw`` (the training split)."""
    features: list[Feature] = []
    if dataset == "criteo":
        for name in CRITEO_NUMERIC:
            features.append(_numeric_feature(raw.get_column(name)))
        categorical = CRITEO_CATEGORICAL
    else:
        for name, vocabulary in AVAZU_CONTEXT.items():
            features.append(
                Feature(
                    name=name, kind=FeatureKind.CATEGORICAL, entity=Entity.CONTEXT,
                    dtype="int64", vocabulary=vocabulary,
                    description="from `hour` (YYMMDDHH, UTC); fixed vocabulary",
                )
            )  # fmt: skip
        categorical = AVAZU_CATEGORICAL
    for name in categorical:
        features.append(_categorical_feature(raw.get_column(name), min_category_count))
    return FeatureSpec(features=tuple(features), encoded=True)


def encode_ctr(raw: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """The model-ready table: ``label`` + codes / numeric values in spec order."""
    columns: list[pl.Expr] = [pl.col("label").cast(pl.Float64)]
    for feature in spec.features:
        if feature.name not in raw.columns:
            raise SourceError(f"column {feature.name!r} of the feature spec is not in the data")
        if feature.kind == FeatureKind.NUMERIC:
            # Missing counts are 0, the Criteo convention (see module doc).
            columns.append(pl.col(feature.name).fill_null(0.0).alias(feature.name))
        else:
            vocabulary = list(feature.vocabulary or ())
            columns.append(
                pl.col(feature.name)
                .fill_null("")
                .replace_strict(
                    vocabulary, range(1, len(vocabulary) + 1), default=0, return_dtype=pl.Int64
                )
                .alias(feature.name)
            )
    return raw.select(columns)


# --------------------------------------------------------------------------- features


def _numeric_feature(values: pl.Series) -> Feature:
    present = values.drop_nulls()
    stats = {
        "mean": present.mean(),
        "std": present.std(),
        "min_value": present.min(),
        "max_value": present.max(),
    }
    return Feature(
        name=values.name,
        kind=FeatureKind.NUMERIC,
        entity=Entity.EXAMPLE,
        dtype="float64",
        normalization=Normalization.LOG1P,
        description="integer count; missing -> 0 in the table; stats of non-missing train values",
        **{k: (float(v) if v is not None else None) for k, v in stats.items()},  # type: ignore[arg-type]
    )


def _categorical_feature(values: pl.Series, min_count: int) -> Feature:
    counts = (
        values.fill_null("")
        .value_counts(name="n")
        .filter(pl.col("n") >= min_count)
        .sort(["n", values.name], descending=[True, False])
    )
    return Feature(
        name=values.name,
        kind=FeatureKind.CATEGORICAL,
        entity=Entity.EXAMPLE,
        dtype="int64",
        vocabulary=tuple(counts.get_column(values.name).to_list()),
        description=f"values seen >= {min_count} times in train, most frequent first; "
        "code 0 = rare or unseen; missing is the value ''",
    )


# --------------------------------------------------------------------------- readers


def _read_criteo_file(path: Path) -> pl.DataFrame:
    data = utf8_bytes(path)
    first = data.split(b"\n", 1)[0].decode()
    separator = "\t" if "\t" in first else ","
    has_header = first.split(separator)[0].strip() == "label"
    frame = _read_strings(path, data, separator, has_header)
    if has_header:
        _check_header(frame, CRITEO_COLUMNS, path)
        frame = frame.select(CRITEO_COLUMNS)
    elif frame.width == len(CRITEO_COLUMNS):
        frame.columns = list(CRITEO_COLUMNS)
    elif frame.width == len(CRITEO_COLUMNS) - 1:  # Kaggle test.txt: no label
        frame.columns = list(CRITEO_COLUMNS[1:])
        frame = frame.with_columns(pl.lit(None, pl.String).alias("label")).select(CRITEO_COLUMNS)
    else:
        raise SourceError(
            f"{path}: {frame.width} fields per line; Criteo has 40 (39 without label)"
        )
    numeric = [_parse_number(frame, name, path) for name in CRITEO_NUMERIC]
    return frame.with_columns(_parse_label(frame, "label", path), *numeric)


def _read_avazu_file(path: Path) -> pl.DataFrame:
    data = utf8_bytes(path)
    has_header = data.split(b",", 1)[0].strip() == b"id"
    frame = _read_strings(path, data, ",", has_header)
    if has_header:
        expected = (
            AVAZU_COLUMNS
            if "click" in frame.columns
            else tuple(c for c in AVAZU_COLUMNS if c != "click")
        )
        _check_header(frame, expected, path)
    elif frame.width == len(AVAZU_COLUMNS):
        frame.columns = list(AVAZU_COLUMNS)
    elif frame.width == len(AVAZU_COLUMNS) - 1:  # Kaggle test.csv: no click
        frame.columns = [c for c in AVAZU_COLUMNS if c != "click"]
    else:
        raise SourceError(f"{path}: {frame.width} fields per line; Avazu has 24 (23 without click)")
    if "click" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("click"))
    # "%y%m%d%H" alone is refused by the parser (an hour needs minutes): add "00".
    hour = (pl.col("hour").str.strip_chars() + "00").str.to_datetime("%y%m%d%H%M", strict=False)
    derived = frame.select(
        _parse_label(frame, "click", path).alias("label"),
        hour.dt.hour().cast(pl.String).alias("hour_of_day"),
        (hour.dt.weekday() - 1).cast(pl.String).alias("weekday"),
        *AVAZU_CATEGORICAL,
    )
    bad = derived.get_column("hour_of_day").null_count()
    if bad:
        example = frame.filter(hour.is_null()).get_column("hour").head(1).to_list()
        raise SourceError(f"{path}: column hour: {bad} value(s) are not YYMMDDHH, e.g. {example}")
    return derived


def _read_strings(path: Path, data: bytes, separator: str, has_header: bool) -> pl.DataFrame:
    try:
        return pl.read_csv(
            data,
            separator=separator,
            has_header=has_header,
            infer_schema=False,
            # The TSV files never quote; hashed values could hold a stray quote.
            quote_char='"' if separator == "," else None,
        )
    except pl.exceptions.PolarsError as exc:
        raise SourceError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _check_header(frame: pl.DataFrame, expected: tuple[str, ...], path: Path) -> None:
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: header lacks column(s) {missing}; found {frame.columns}")


def _parse_label(frame: pl.DataFrame, column: str, path: Path) -> pl.Expr:
    raw = pl.col(column).str.strip_chars()
    label = raw.cast(pl.Float64, strict=False)
    bad = frame.filter(raw.is_not_null() & ~label.is_in([0.0, 1.0]).fill_null(False))
    if bad.height:
        example = bad.get_column(column).head(3).to_list()
        raise SourceError(f"{path}: column {column}: {bad.height} label(s) not 0/1, e.g. {example}")
    return label.alias("label")


def _parse_number(frame: pl.DataFrame, column: str, path: Path) -> pl.Expr:
    raw = pl.col(column).str.strip_chars()
    value = raw.cast(pl.Float64, strict=False)
    bad = frame.filter(raw.is_not_null() & (raw != "") & value.is_null())
    if bad.height:
        example = bad.get_column(column).head(3).to_list()
        raise SourceError(
            f"{path}: column {column}: {bad.height} value(s) not numbers, e.g. {example}"
        )
    return value.alias(column)


def _name(path: str | Path, dataset: str) -> str:
    stem = Path(str(path)).stem
    return f"{dataset}-{stem}" if dataset not in stem.lower() else stem
