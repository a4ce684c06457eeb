"""Real data through the CLI: download from a mirror, import, validate, summarize."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from features.dataset import read_examples
from features.feature_spec import FeatureSpec
from infra.config import load_config
from pipelines.cli import main
from pipelines.runner import published

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip


def _ml100k_archive() -> bytes:
    """A small archive in the exact ml-100k.zip layout: 3 users, 4 items, 10 ratings."""
    flags = "|".join(["0"] * 18 + ["1"])
    items = "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x/{i}|{flags}\n" for i in range(1, 5))
    ratings = "".join(
        f"{u}\t{i}\t{(u + i) % 5 + 1}\t{881250949 + u * 10 + i}\n"
        for u in (1, 2, 3)
        for i in (1, 2, 3)
    )
    ratings += "3\t4\t5\t881250999\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-100k/u.data", ratings)
        archive.writestr(
            "ml-100k/u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n"
        )
        archive.writestr("ml-100k/u.item", items)
        archive.writestr(
            "ml-100k/u.genre", "".join(f"{g}|{n}\n" for n, g in enumerate(GENRES)) + "\n"
        )
    return buffer.getvalue()


def _set_args(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


@pytest.fixture()
def mirror(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A plain static HTTP server on 127.0.0.1 serving ml-100k.zip; yields (url, sha256)."""
    root = tmp_path / "mirror"
    root.mkdir()
    data = _ml100k_archive()
    (root / "ml-100k.zip").write_bytes(data)

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.sha256(data).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


def test_download_then_run_the_pipeline_on_it(
    mirror: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, sha = mirror
    dest = tmp_path / "datasets"
    assert (
        main(
            [
                "data",
                "download",
                "movielens-100k",
                "--dest",
                str(dest),
                "--base-url",
                url,
                "--sha256",
                sha,
            ]
        )
        == 0
    )
    assert "rayrec data import movielens" in capsys.readouterr().out
    folder = dest / "ml-100k"
    sets = [f"paths.workdir={tmp_path / 'wd'}", f"data.source={{kind: movielens, path: {folder}}}"]
    assert main(["run", "-p", "tiny", *_set_args(sets)]) == 0
    config = load_config("tiny", sets, environ={})
    validated = published(config, "validate")
    assert validated is not None
    assert validated.manifest["row_counts"] == {
        "users": 3, "items": 4, "events": 10,
        "users_quarantined": 0, "items_quarantined": 0, "events_quarantined": 0,
    }  # fmt: skip
    summary = json.loads(published(config, "summarize").path.join("summary.json").read_text())  # type: ignore[union-attr]
    # label = rating >= 4; the ratings are 3,4,5, 4,5,1, 5,1,2 and 5: six of ten.
    assert summary["positive_rate"] == pytest.approx(0.6)
    # Ten ratings cannot train and judge a click model: the ranker steps say so and skip.
    ranker = json.loads(published(config, "train_ranker").path.join("ranker.json").read_text())  # type: ignore[union-attr]
    assert ranker["skipped"].startswith("too little data: the ")
    finetuned = json.loads(
        published(config, "finetune_ranker").path.join("finetune.json").read_text()
    )  # type: ignore[union-attr]
    assert finetuned == {"skipped": "no model"}


def test_checksum_mismatch_is_one_line_and_leaves_nothing(
    mirror: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = mirror
    dest = tmp_path / "datasets"
    # No --sha256: the registry's pinned hash of the real archive cannot match the test archive.
    assert main(["data", "download", "movielens-100k", "--dest", str(dest), "--base-url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "sha256" in err and len(err.splitlines()) == 1
    assert not (dest / "ml-100k").exists()


def test_real_movielens_100k_runs_through_validate_and_summarize(
    shared_datasets: Path, tmp_path: Path
) -> None:
    sets = [
        f"paths.workdir={tmp_path / 'wd'}",
        f"data.source={{kind: movielens, path: {shared_datasets / 'ml-100k'}}}",
    ]
    # Up to the features the models read: training on all 100k ratings is the
    # benchmarks' job (retrieval_quality, ranker_quality), not a test's.
    for step in ("features", "summarize"):
        assert main(["run", "-p", "tiny", "--until", step, *_set_args(sets)]) == 0
    config = load_config("tiny", sets, environ={})
    assert published(config, "features").manifest["row_counts"]["examples"] == 100_000  # type: ignore[union-attr]
    counts = published(config, "validate").manifest["row_counts"]  # type: ignore[union-attr]
    assert (counts["events"], counts["users"], counts["items"]) == (100_000, 943, 1_682)
    assert counts["events_quarantined"] == 0
    summary = json.loads(published(config, "summarize").path.join("summary.json").read_text())  # type: ignore[union-attr]
    assert summary["active_users"] == 943 and summary["active_items"] == 1_682
    # 55,375 of the 100,000 ratings are 4 or 5 (the published CTR-style label).
    assert summary["positive_rate"] == pytest.approx(0.55375)
    # Every example carries its 1-5 rating, the reranker's second target (never a feature).
    features = published(config, "features").path  # type: ignore[union-attr]
    spec = FeatureSpec.load(features)
    assert spec.labels == ("label", "rating") and "rating" not in spec.names
    rated = read_examples(features).select("label", "rating").collect()
    assert rated.get_column("rating").null_count() == 0
    assert ((rated.get_column("rating") >= 4) == (rated.get_column("label") == 1)).all()


@pytest.mark.parametrize(
    ("kind", "folder", "train_rows"),
    [("criteo", "criteo-sample", 7_200), ("avazu", "avazu-sample", 8_087)],
)
def test_real_ctr_samples_run_as_generic_feature_tables(
    shared_datasets: Path, tmp_path: Path, kind: str, folder: str, train_rows: int
) -> None:
    sets = [
        f"paths.workdir={tmp_path / 'wd'}",
        f"data.source={{kind: {kind}, path: {shared_datasets / folder}}}",
    ]
    assert main(["run", "-p", "tiny", *_set_args(sets)]) == 0
    config = load_config("tiny", sets, environ={})
    counts = published(config, "validate").manifest["row_counts"]  # type: ignore[union-attr]
    assert counts == {"examples": train_rows, "examples_quarantined": 0}
    summary = json.loads(published(config, "summarize").path.join("summary.json").read_text())  # type: ignore[union-attr]
    assert summary["rows"] == train_rows
    assert 0.05 < summary["positive_rate"] < 0.5  # display-ads click rates
    # The reranker trains on the table through its spec alone (no ids, no time: a random split).
    ranker = json.loads(published(config, "train_ranker").path.join("ranker.json").read_text())  # type: ignore[union-attr]
    assert ranker["split"] == "random" and ranker["test"]["auc"] > 0.55
    finetuned = json.loads(
        published(config, "finetune_ranker").path.join("finetune.json").read_text()
    )  # type: ignore[union-attr]
    assert finetuned == {"skipped": "a table without time has no newest window"}
    two_stage = json.loads(
        published(config, "evaluate_two_stage").path.join("two_stage.json").read_text()  # type: ignore[union-attr]
    )
    assert two_stage == {"skipped": "a CTR table has no users and items to retrieve for"}
