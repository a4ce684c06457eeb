"""The ``rayrec`` command line: a thin shell over typed library functions.

Heavy modules (the runner pulls in MLflow, steps pull in Polars and the
simulator) are imported inside the commands, so ``--help`` answers at once.

Tests call :func:`main` in-process with an argv list. Every failure a user can
fix ends as one line on stderr and a non-zero exit; ``--debug`` (or
``RAYREC_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.config import RayrecConfig, load_config
from infra.errors import RayrecError
from infra.logs import configure_logging

app = typer.Typer(
    name="rayrec",
    help=(
        "rayrec: recommendation and CTR prediction on Ray, from raw events to a monitored API. "
        "Errors print one line; add --debug anywhere (or set RAYREC_DEBUG=1) for the traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Bring data in: simulate, import, download, validate.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
features_app = typer.Typer(
    help="Feature pipelines: offline store and online store.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(config_app, name="config")
train_app = typer.Typer(help="Train models (Ray Train).", no_args_is_help=True)
index_app = typer.Typer(help="Candidate index of the trained item vectors.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Offline evaluation on held-out data.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")
app.add_typer(evaluate_app, name="evaluate")
tune_app = typer.Typer(help="Hyper-parameter search (Ray Tune).", no_args_is_help=True)
finetune_app = typer.Typer(help="Fine-tune trained models on fresh data.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(finetune_app, name="finetune")
serve_app = typer.Typer(help="The online recommendation API (Ray Serve).", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
monitor_app = typer.Typer(help="Drift monitoring and alert e-mails.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")
schedule_app = typer.Typer(
    help="Scheduled runs: cron slots of schedule.jobs submitted as Ray Jobs.",
    invoke_without_command=True,
)
app.add_typer(schedule_app, name="schedule")
deploy_app = typer.Typer(
    help="Cluster manifests (KubeRay, CronJobs) rendered from the config.", no_args_is_help=True
)
app.add_typer(deploy_app, name="deploy")

out = Console()

PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="tiny | default | large, or a YAML file.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set simulator.n_users=500 (repeatable)."
    ),
]


def _config(preset: str, sets: list[str] | None, extra: list[str] | None = None) -> RayrecConfig:
    config = load_config(preset, [*(sets or []), *(extra or [])])
    configure_logging(config.logging)
    return config


def _run(config: RayrecConfig, until: str | None, force: bool, track: bool) -> None:
    from pipelines.main import MAIN
    from pipelines.runner import run_pipeline

    if until is not None:
        MAIN.step(until)
    record = run_pipeline(MAIN, config, until=until, force=force, track=track)
    table = Table(title=f"run {record.run_id} ({record.status})")
    for column in ("step", "status", "seconds", "rows", "version"):
        table.add_column(column)
    for step in record.steps:
        rows = ", ".join(f"{k}={v:,}" for k, v in step.row_counts.items())
        table.add_row(step.name, step.status, f"{step.duration_s:.1f}", rows, step.version)
    out.print(table)
    out.print(f"workdir: {config.paths.workdir}   mlflow run: {record.mlflow_run_id or '-'}")


def _step_record(config: RayrecConfig, step: str, file: str, force: bool = False) -> dict[str, Any]:
    """Run the pipeline up to ``step`` (skipping what is current), then read its published ``file``."""
    from pipelines.runner import published

    _run(config, step, force, track=True)
    current = published(config, step)
    if current is None:
        raise typer.Exit(1)
    return json.loads(current.path.join(file).read_text())


@app.command()
def run(
    preset: PresetOpt = "default",
    until: Annotated[
        str | None, typer.Option(help="Stop after this step (and what it needs).")
    ] = None,
    sets: SetOpt = None,
    force: Annotated[
        bool, typer.Option(help="Rerun steps even when their output is current.")
    ] = False,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Run the main pipeline (all steps, or up to --until)."""
    config = _config(preset, sets)
    _run(config, until, force, track)
    if until is None and config.serving.app.deploy_after_run:
        _redeploy(config)


def _redeploy(config: RayrecConfig) -> None:
    """The run's last act: the running API (or the cluster's) serves the new champion."""
    from pipelines.serve import push, server_pid, signal_server

    if server_pid(config) is not None:
        signal_server(config, signal.SIGHUP)
        out.print("serving: asked the running API to load the champion (rayrec serve status)")
    elif os.environ.get("RAY_ADDRESS") or config.ray.address:
        from infra.ray_runtime import ensure_ray

        ensure_ray(config.ray)
        result = push(config)
        out.print(f"serving: generation {result.generation} deployed {result.versions}")
    else:
        out.print("serving: no API running; start one with `rayrec serve start`")


@app.command()
def steps(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """List the main pipeline's steps in order, with their published versions."""
    from pipelines.main import MAIN
    from pipelines.runner import published

    config = _config(preset, sets)
    table = Table(title=f"pipeline {MAIN.name}")
    for column in ("step", "reads", "published", "description"):
        table.add_column(column)
    for step in MAIN.order():
        current = published(config, step.name)
        table.add_row(
            step.name,
            ", ".join(step.inputs) or "-",
            current.version if current else "-",
            step.description,
        )
    out.print(table)


@app.command()
def runs(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    limit: Annotated[int, typer.Option(help="How many runs to show.")] = 20,
) -> None:
    """List past runs of this workdir, newest first."""
    from pipelines.runner import list_runs

    config = _config(preset, sets)
    table = Table(title=f"runs in {config.paths.workdir}")
    for column in ("run", "status", "preset", "started", "steps"):
        table.add_column(column)
    for record in list_runs(config)[:limit]:
        summary = " ".join(f"{s['name']}:{s['status']}" for s in record["steps"])
        table.add_row(
            record["run_id"], record["status"], record["preset"], record["started_at"][:19], summary
        )
    out.print(table)
    from pipelines.schedule import ScheduleState

    submissions = ScheduleState(config).history(limit)
    if submissions:
        title = "scheduled submissions (as last recorded; `rayrec schedule status` refreshes)"
        out.print(_submissions_table(submissions, title))


@data_app.command("simulate")
def data_simulate(preset: PresetOpt = "default", sets: SetOpt = None, force: bool = False) -> None:
    """Generate a click log with the simulator (the `ingest` step, simulator source)."""
    config = _config(preset, sets, ["data.source={kind: simulator}"])
    _run(config, "ingest", force, track=True)


@data_app.command("import")
def data_import(
    kind: Annotated[str, typer.Argument(help="movielens | criteo | avazu | files | recbole")],
    path: Annotated[Path, typer.Argument(help="The file or folder to read.", exists=True)],
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: bool = False,
) -> None:
    """Import a dataset into the workdir (the `ingest` step with that source)."""
    source = json.dumps({"kind": kind, "path": str(path.resolve())})
    config = _config(preset, sets, [f"data.source={source}"])
    _run(config, "ingest", force, track=True)


@data_app.command("validate")
def data_validate(preset: PresetOpt = "default", sets: SetOpt = None, force: bool = False) -> None:
    """Validate the ingested data; bad rows go to the quarantine file with reasons."""
    config = _config(preset, sets)
    _run(config, "validate", force, track=True)


@data_app.command("download")
def data_download(
    name: Annotated[
        str, typer.Argument(help="movielens-100k | movielens-1m | movielens-25m | ml-latest-small")
    ],
    dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("datasets"),
    base_url: Annotated[
        str | None, typer.Option(help="Mirror to download from instead of GroupLens.")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option(help="Expected sha256 when the mirror serves a re-packed archive.")
    ] = None,
) -> None:
    """Download a public dataset (pinned checksum, resumable), then print how to import it."""
    from features.sources.download import download_dataset

    folder = download_dataset(name, dest, base_url=base_url, expected_sha256=sha256)
    out.print(f"{name}: {folder}")
    out.print(f"import it with: rayrec data import movielens {folder}")


@features_app.command("build")
def features_build(
    engine: Annotated[str, typer.Option(help="polars (one machine) or ray (Ray Data).")] = "polars",
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: bool = False,
) -> None:
    """Build point-in-time training examples, buckets and latest vectors (publishes atomically)."""
    config = _config(preset, sets, [f"features.engine={engine}"])
    _run(config, "features", force, track=True)


@features_app.command("materialize")
def features_materialize(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Load again even when the store is current.")] = False,
) -> None:
    """Load the latest feature values into the online store (SQLite or Redis, by config)."""
    config = _config(preset, sets)
    _run(config, "materialize", force, track=True)


@train_app.command("retrieval")
def train_retrieval_command(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: Annotated[
        bool, typer.Option(help="Train again even when the model is current.")
    ] = False,
) -> None:
    """Train the two-tower retrieval model (and the steps it needs) on Ray Train."""
    config = _config(preset, sets)
    _run(config, "train_retrieval", force, track=True)


@train_app.command("ranker")
def train_ranker_command(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: Annotated[
        bool, typer.Option(help="Train again even when the model is current.")
    ] = False,
) -> None:
    """Train the MoE reranker (and the steps it needs) on Ray Train, calibrated and registered."""
    config = _config(preset, sets)
    _run(config, "register_ranker", force, track=True)


@tune_app.command("ranker")
def tune_ranker_command(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    trials: Annotated[
        int | None, typer.Option(help="Trials of the search (models.ranker.tuning.trials).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Search again even when the result is current.")
    ] = False,
) -> None:
    """Search the reranker's hyper-parameters with Ray Tune (ASHA + Optuna), then train the best."""
    extra = ["models.ranker.tuning.enabled=true"]
    if trials is not None:
        extra.append(f"models.ranker.tuning.trials={trials}")
    config = _config(preset, sets, extra)
    _run(config, "register_ranker", force, track=True)


@finetune_app.command("ranker")
def finetune_ranker_command(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    window: Annotated[
        int | None,
        typer.Option(help="Newest days to fine-tune on (models.ranker.finetune.window_days)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Fine-tune again even when the result is current.")
    ] = False,
) -> None:
    """LoRA fine-tune of the trained reranker on the newest days, judged on the window's end."""
    extra = [] if window is None else [f"models.ranker.finetune.window_days={window}"]
    config = _config(preset, sets, extra)
    record = _step_record(config, "finetune_ranker", "finetune.json", force)
    if "skipped" in record:
        out.print(f"fine-tuning skipped: {record['skipped']}")
        return
    out.print(
        f"window {record['window_days']} day(s): AUC {record['base']['auc']:.4f} -> "
        f"{record['finetuned']['auc']:.4f} on {record['rows']['holdout']:,} held-out rows; "
        f"{record['trainable_parameters']:,} of {record['total_parameters']:,} parameters trained "
        f"in {record['seconds']:.1f} s; {'kept' if record['improved'] else 'not better, base kept'}"
    )


@index_app.command("build")
def index_build(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    force: Annotated[
        bool, typer.Option(help="Build again even when the index is current.")
    ] = False,
) -> None:
    """Build the candidate index (exact, HNSW or IVF by catalogue size and config)."""
    config = _config(preset, sets)
    _run(config, "index", force, track=True)


@evaluate_app.command("retrieval")
def evaluate_retrieval(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Test metrics of the current retrieval model beside the most-popular baseline."""
    summary = _step_record(_config(preset, sets), "train_retrieval", "retrieval.json")
    if "test" not in summary:
        out.print(f"no retrieval model: {summary}")
        return
    table = Table(title="retrieval, test split, full ranking (seen items excluded)")
    table.add_column("metric")
    table.add_column("two_tower", justify="right")
    table.add_column("95% CI (bootstrap over users)", justify="right")
    table.add_column("popularity", justify="right")
    for key in (
        "recall@10",
        "ndcg@10",
        "mrr@10",
        "hit@10",
        "recall@50",
        "recall@100",
        "coverage@10",
    ):
        popular = summary["popularity_test"].get(key)
        interval = summary.get("test_ci95", {}).get(key)
        table.add_row(
            key,
            f"{summary['test'][key]:.4f}",
            "-" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]",
            "-" if popular is None else f"{popular:.4f}",
        )
    out.print(table)


@evaluate_app.command("ranker")
def evaluate_ranker(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Test CTR metrics of the current reranker beside logistic regression on the same rows."""
    summary = _step_record(_config(preset, sets), "train_ranker", "ranker.json")
    if "test" not in summary:
        out.print(f"no reranker: {summary}")
        return
    table = Table(
        title=f"reranker ({summary['kind']}), test split ({summary['split']}), "
        f"{summary['rows']['test']:,} rows"
    )
    table.add_column("metric")
    table.add_column(f"{summary['kind']} (calibrated)", justify="right")
    table.add_column(f"{summary['kind']} (raw)", justify="right")
    table.add_column("logistic regression", justify="right")
    for key in ("auc", "gauc", "logloss", "ece"):
        table.add_row(
            key,
            f"{summary['test'][key]:.4f}",
            f"{summary['test_uncalibrated'][key]:.4f}",
            f"{summary['logistic_test'][key]:.4f}",
        )
    out.print(table)


@evaluate_app.command("two-stage")
def evaluate_two_stage(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Retrieve top-N, rerank, NDCG/Recall@K of both orders on held-out requests (and the truth)."""
    record = _step_record(_config(preset, sets), "evaluate_two_stage", "two_stage.json")
    if "skipped" in record:
        out.print(f"two-stage evaluation skipped: {record['skipped']}")
        return
    k, n = record["K"], record["N"]
    orders = [
        o for o in ("retrieval", "reranked", "base_reranked", "oracle") if f"{o}_ndcg@{k}" in record
    ]
    columns = [
        c
        for c in ("ndcg", "recall", "true_ndcg", "global_true_ndcg", "exposed")
        if f"retrieval_{c}@{k}" in record
    ]
    table = Table(
        title=f"two-stage: {record['n_requests']:,} held-out requests from "
        f"{record['held_out_from'][:19]}, N={n}, K={k}, reranker {record['reranker']}"
    )
    table.add_column("order")
    for column in columns:
        table.add_column(f"{column}@{k}", justify="right")
    for order in orders:
        table.add_row(order, *(f"{record[f'{order}_{column}@{k}']:.4f}" for column in columns))
    for order in orders[1:]:
        cells = []
        for column in columns:
            difference = f"{order}_minus_retrieval_{column}@{k}"
            low, high = record[f"{difference}_ci95"]
            cells.append(f"{record[difference]:+.3f} [{low:+.3f}, {high:+.3f}]")
        table.add_row(f"{order} - retrieval", *cells)
    out.print(table)
    out.print(
        "differences: mean over requests and its paired bootstrap 95% CI; "
        f"candidate_recall@{n} {record[f'candidate_recall@{n}']:.4f}; "
        f"reranked keeps {record[f'reranked_overlap@{k}']:.0%} of retrieval's top {k}"
    )


@serve_app.command("start")
def serve_start(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Run the API in the foreground (Ctrl-C or `rayrec serve stop` ends it)."""
    from pipelines.serve import base_url, serve_forever, server_pid

    config = _config(preset, sets)
    pid = server_pid(config)
    if pid is not None:
        typer.echo(f"error: already serving this workdir (pid {pid})", err=True)
        raise typer.Exit(1)
    out.print(f"serving on {base_url(config)} (docs at /docs)")
    serve_forever(config)


@serve_app.command("status")
def serve_status(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """What the running API serves (exit 1 when it is not ready)."""
    from pipelines.serve import base_url, served, server_pid

    config = _config(preset, sets)
    answer = served(config)
    if answer is None:
        out.print(f"nothing answers on {base_url(config)} (server pid: {server_pid(config)})")
        raise typer.Exit(1)
    answer.pop("sources", None)
    out.print_json(json.dumps(answer))
    if not answer.get("ready"):
        raise typer.Exit(1)


@serve_app.command("reload")
def serve_reload(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the swap.")] = 120.0,
) -> None:
    """Swap the running API to the current champion (zero failed requests; a bad model is refused)."""
    from pipelines.serve import served, signal_server

    config = _config(preset, sets)
    before = (served(config) or {}).get("generation")
    signal_server(config, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        answer = served(config) or {}
        if answer.get("generation") != before:
            out.print(f"serving generation {answer['generation']}: {answer['model_versions']}")
            return
    typer.echo(
        "error: the API still serves generation "
        f"{before}: nothing new to load, or the models were refused (see the server's log)",
        err=True,
    )
    raise typer.Exit(1)


@serve_app.command("stop")
def serve_stop(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Stop the running API (Serve shut down; the process exits)."""
    from pipelines.serve import server_pid, signal_server

    config = _config(preset, sets)
    pid = signal_server(config, signal.SIGTERM)
    for _ in range(120):
        if server_pid(config) is None:
            out.print(f"stopped (pid {pid})")
            return
        time.sleep(0.5)
    typer.echo(f"error: pid {pid} still running after 60 s", err=True)
    raise typer.Exit(1)


@app.command()
def recommend(
    user: Annotated[int, typer.Option(help="The user id.")],
    k: Annotated[int, typer.Option(help="How many items.")] = 10,
    preset: PresetOpt = "default",
    sets: SetOpt = None,
) -> None:
    """Ask the running API for a user's recommendations (a client of POST /v1/recommendations)."""
    import httpx

    from pipelines.serve import base_url

    config = _config(preset, sets)
    response = httpx.post(
        f"{base_url(config)}/v1/recommendations", json={"user_id": user, "k": k}, timeout=10.0
    )
    if response.status_code != 200:
        typer.echo(f"error: HTTP {response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    body = response.json()
    table = Table(
        title=f"user {user}: request {body['request_id']}"
        f"{' (fallback: popularity)' if body['fallback'] else ''}"
    )
    for column in ("rank", "item", "score", "retrieval", "propensity"):
        table.add_column(column)
    for rank, item in enumerate(body["items"], start=1):
        retrieval = item["retrieval_score"]
        table.add_row(
            str(rank),
            str(item["item_id"]),
            f"{item['score']:.4f}",
            "-" if retrieval is None else f"{retrieval:.3f}",
            f"{item['propensity']:.3f}",
        )
    out.print(table)
    out.print(f"models: {body['model_versions']}")


@monitor_app.command("test-email")
def monitor_test_email(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Send one test e-mail through monitoring.alerts.smtp to its recipients."""
    from monitoring.alerts import send_test_email

    config = _config(preset, sets)
    alerts = config.monitoring.alerts
    if not alerts.smtp.recipients:
        typer.echo(
            "error: no recipients: set monitoring.alerts.smtp.recipients "
            "(e.g. RAYREC_MONITORING__ALERTS__SMTP__RECIPIENTS='[\"ops@example.com\"]')",
            err=True,
        )
        raise typer.Exit(1)
    message_id = send_test_email(alerts)
    smtp = alerts.smtp
    out.print(
        f"sent to {', '.join(smtp.recipients)} via {smtp.host}:{smtp.port} "
        f"({smtp.security}); message id {message_id}"
    )


@monitor_app.command("run")
def monitor_run(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    window_end: Annotated[
        str | None,
        typer.Option(
            "--window-end",
            help="End of the window (exclusive), YYYY-MM-DD in UTC; default: the midnight "
            "after the newest example.",
        ),
    ] = None,
    window_days: Annotated[
        int | None,
        typer.Option("--window-days", min=1, help="Days in the window (monitoring.window_days)."),
    ] = None,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Judge one window of the examples against the reference profile: data, prediction and
    concept drift; Evidently reports; one alert e-mail for the findings; MLflow."""
    import datetime as dt

    from pipelines.monitor import run_monitoring

    config = _config(preset, sets)
    end = None
    if window_end is not None:
        try:
            end = dt.date.fromisoformat(window_end)
        except ValueError:
            typer.echo(f"error: --window-end must be YYYY-MM-DD, got {window_end!r}", err=True)
            raise typer.Exit(2) from None
    record = run_monitoring(config, end, window_days, track=track)
    rows = record.rows.get("window", 0)
    table = Table(title=f"monitor {record.key}: {rows:,} rows")
    for column in ("check", "column", "test", "statistic", "threshold", "drifted"):
        # Fold, not truncate: a feature's name is what the reader looks for.
        table.add_column(column, overflow="fold")
    for check in record.checks:
        threshold = check["threshold"]
        if isinstance(threshold, list):
            threshold = f"[{threshold[0]:+.4g}, {threshold[1]:+.4g}]"
        elif threshold is not None:
            threshold = f"{threshold:.4g}"
        statistic = check["statistic"]
        verdict = ("yes" if check["drifted"] else "no") if check["judged"] else check["note"]
        table.add_row(
            check["check"].removesuffix("_drift"),
            check["column"],
            check["test"] or "-",
            "-" if statistic is None else f"{statistic:.4g}",
            threshold or "-",
            verdict,
        )
    out.print(table)
    if record.reason:
        out.print(f"not judged: {record.reason}")
    delivery = record.delivery
    if delivery is not None:
        out.print(
            f"findings: {', '.join(record.findings) or '-'}; sent {list(delivery.sent)}, "
            f"duplicate {list(delivery.suppressed_duplicate)}, cooldown "
            f"{list(delivery.suppressed_cooldown)}, dead-lettered {list(delivery.dead_lettered)}"
        )
    else:
        out.print(f"findings: {', '.join(record.findings) or '-'}")
    if record.delivery_note:
        out.print(f"alert: {record.delivery_note}")
    out.print(
        f"reports: {record.reports}   mlflow run: {record.mlflow_run_id or '-'}   "
        f"{record.seconds:.1f} s"
    )
    if record.delivery_failed:
        typer.echo(f"error: alert not delivered: {record.delivery_note}", err=True)
        raise typer.Exit(1)


@monitor_app.command("ui")
def monitor_ui(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Port (default: monitoring.ui_port, 8700).")
    ] = None,
) -> None:
    """Browse every monitor run's Evidently reports (the workdir's Evidently workspace) in
    Evidently's UI, in the foreground; Ctrl-C stops it."""
    from monitoring.workspace import serve_ui, workspace_path

    config = _config(preset, sets)
    folder = workspace_path(config.paths.workdir)
    chosen = port or config.monitoring.ui_port
    out.print(f"Evidently UI for {folder}: http://{host}:{chosen}")
    serve_ui(folder, host, chosen)


abtest_app = typer.Typer(
    help="A/B simulation and off-policy evaluation against the simulator.", no_args_is_help=True
)
app.add_typer(abtest_app, name="abtest")


@abtest_app.command("simulate")
def abtest_simulate(
    a: Annotated[str, typer.Option("--a", help="Policy of arm A (the control).")] = "popularity",
    b: Annotated[str, typer.Option("--b", help="Policy of arm B (the treatment).")] = "affinity",
    users: Annotated[int, typer.Option(help="Users enrolled.")] = 5_000,
    days: Annotated[int, typer.Option(help="Days simulated.")] = 7,
    share_b: Annotated[int, typer.Option(help="Percent of users in arm B.")] = 50,
    salt: Annotated[str, typer.Option(help="Salt of the user-hash split.")] = "abtest",
    requests_per_user_day: Annotated[
        float, typer.Option(help="Mean requests per average user and day.")
    ] = 1.0,
    explore: Annotated[
        float, typer.Option(help="Arm A's exploration epsilon (logs propensities for IPS).")
    ] = 0.0,
    candidates: Annotated[
        int, typer.Option(help="Two-stage candidates and exploration pool.")
    ] = 50,
    start_day: Annotated[
        int | None, typer.Option(help="First day (default: the day after the logged data).")
    ] = None,
    ope_log: Annotated[
        str, typer.Option(help="Off-policy log: all (A on every request) | arm (A's half).")
    ] = "all",
    seed: Annotated[int, typer.Option(help="Seed of enrolment, traffic and clicks.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the record here.")] = None,
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Run policies A and B on simulated traffic (user-hash split); CTR per arm, lift with
    a 95% CI and p-value, the simulator's true CTRs; IPS/SNIPS of B from A's log."""
    from pipelines.abtest import AbTestSettings, run_abtest

    config = _config(preset, sets)
    settings = AbTestSettings(
        a=a,
        b=b,
        users=users,
        days=days,
        share_b=share_b,
        salt=salt,
        requests_per_user_day=requests_per_user_day,
        start_day=start_day,
        explore=explore,
        candidates=candidates,
        ope_log=ope_log,  # type: ignore[arg-type]  # checked by AbTestSettings
        seed=seed,
    )
    result, run_id = run_abtest(config, settings, track=track)
    record = result.to_dict()
    table = Table(title=f"A/B: {a} (A) vs {b} (B), {record['counts']['requests']:,} requests")
    for column in ("", "A", "B", "B - A [95% CI]", "relative"):
        table.add_column(column, justify="right")
    table.add_row(
        "observed CTR",
        f"{record['ab_ctr_a']:.4f}",
        f"{record['ab_ctr_b']:.4f}",
        f"{record['ab_lift']:+.4f} [{record['ab_ci_low']:+.4f}, {record['ab_ci_high']:+.4f}]",
        f"{record['ab_relative_lift']:+.1%}",
    )
    table.add_row(
        "true CTR",
        f"{record['true_ctr_a']:.4f}",
        f"{record['true_ctr_b']:.4f}",
        f"{record['true_lift']:+.4f}",
        f"{record['true_relative_lift']:+.1%}",
    )
    out.print(table)
    out.print(
        f"p-value {record['ab_p_value']:.3g}; bootstrap CI [{record['bootstrap_ci_low']:+.4f}, "
        f"{record['bootstrap_ci_high']:+.4f}]; CI covers the true lift: "
        f"{record['ci_covers_true_lift']}"
    )
    if "snips_ctr" in record:
        out.print(
            f"off-policy estimate of B from A's log: IPS {record['ips_ctr']:.4f}, SNIPS "
            f"{record['snips_ctr']:.4f} [{record['snips_ci_low']:.4f}, {record['snips_ci_high']:.4f}]"
            f" vs true {record['true_ctr_b']:.4f}; coverage {record['ope_coverage']:.0%}"
        )
    if record["note"]:
        out.print(record["note"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2, default=float))
    out.print(f"mlflow run: {run_id or '-'}")


@deploy_app.command("render")
def deploy_render(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    out: Annotated[
        Path, typer.Option(help="Folder to write (or, with --check, compare) the manifests.")
    ] = Path("infra/deploy/k8s"),
    image_repository: Annotated[
        str, typer.Option(help="Image repository; tags are <version>-cpu and <version>-gpu.")
    ] = "rayrec",
    image_tag: Annotated[
        str | None, typer.Option(help="Image version (default: the installed rayrec's).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            help="A pod environment variable, e.g. RAYREC_MLFLOW__TRACKING_URI=http://mlflow.ml:5000 "
            "(repeatable; added to the defaults in pipelines.deploy.DEFAULT_ENV)."
        ),
    ] = None,
    storage_class: Annotated[
        str | None,
        typer.Option(
            help="StorageClass of the workdir claim (ReadWriteMany; default: the cluster's)."
        ),
    ] = None,
    revision: Annotated[
        int,
        typer.Option(
            help="Serve app revision: bump it to rebuild the app on the current champion."
        ),
    ] = 0,
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 if the folder differs from the render.")
    ] = False,
) -> None:
    """Render the KubeRay manifests (RayCluster, RayService, RayJob, a CronJob per
    schedule.jobs entry) for a preset; infra/deploy/k8s holds the default preset's."""
    from pipelines.deploy import DEFAULT_ENV, DeploySpec, drifted, render, write

    pod_env = dict(DEFAULT_ENV)
    for item in env or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            typer.echo(f"error: --env expects NAME=VALUE, got {item!r}", err=True)
            raise typer.Exit(2)
        pod_env[name] = value
    spec = DeploySpec(
        image_repository=image_repository,
        image_tag=image_tag,
        env=pod_env,
        storage_class=storage_class,
    )
    files = render(preset, sets or [], spec, revision)
    if check:
        stale = drifted(files, out)
        if stale:
            typer.echo(f"error: {out} differs from the render: {', '.join(stale)}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out}: up to date ({len(files)} files)")
        return
    for path in write(files, out):
        typer.echo(str(path))


@schedule_app.callback()
def schedule(
    ctx: typer.Context,
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    once: Annotated[
        bool, typer.Option(help="Handle the slots due now (the catch-up), then exit.")
    ] = False,
    until: Annotated[
        str | None,
        typer.Option(help="Stop at this time (ISO 8601; without an offset: schedule.timezone)."),
    ] = None,
    max_fires: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many handled slots.")
    ] = None,
) -> None:
    """Run the scheduler in the foreground (Ctrl-C stops it): every cron slot of
    schedule.jobs becomes a Ray Job `<job>-<logical date>`; no overlapping runs of a job;
    a slot missed while it was down runs once when it is back (schedule.misfire_grace_s)."""
    if ctx.invoked_subcommand is not None:
        return
    import datetime as dt
    import threading
    from zoneinfo import ZoneInfo

    from pipelines.schedule import ConfigArgs, Submission, run_scheduler

    config = _config(preset, sets)
    _check_schedule_commands(config)
    end = None
    if until is not None:
        try:
            end = dt.datetime.fromisoformat(until)
        except ValueError:
            typer.echo(f"error: --until must be ISO 8601, got {until!r}", err=True)
            raise typer.Exit(2) from None
        if end.tzinfo is None:
            end = end.replace(tzinfo=ZoneInfo(config.schedule.timezone))
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())

    def show(record: Submission) -> None:
        out.print(
            f"{record.submission_id}: {record.outcome}"
            f"{f' ({record.status})' if record.status else ''}"
            f"{f' - {record.message}' if record.outcome != 'submitted' and record.message else ''}"
        )

    enabled = [n for n, j in config.schedule.jobs.items() if j.enabled]
    out.print(f"scheduling {', '.join(enabled) or 'nothing'} ({config.schedule.timezone})")
    try:
        handled = run_scheduler(
            config,
            ConfigArgs(preset, tuple(sets or ())),
            once=once,
            until=end,
            stop_after=max_fires,
            stop=stop,
            on_fire=show,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print(f"{len(handled)} slot(s) handled; history: rayrec schedule status")
    if any(record.outcome == "failed" for record in handled):
        raise typer.Exit(1)


def _check_schedule_commands(config: RayrecConfig) -> None:
    """A job's command must start with a rayrec command, or every slot fails on the cluster."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, job in config.schedule.jobs.items():
        if job.enabled and job.command[0] not in commands:
            typer.echo(
                f"error: schedule.jobs.{name}.command starts with {job.command[0]!r}, "
                f"not a rayrec command ({', '.join(sorted(commands))})",
                err=True,
            )
            raise typer.Exit(2)


def _submissions_table(records: list[Any], title: str) -> Table:
    table = Table(title=title)
    # The submission id holds the logical date (in schedule.timezone).
    for column in ("job", "submission id", "outcome", "status", "fired (UTC)", "note"):
        table.add_column(column, overflow="fold")
    for record in records:
        note = "" if record.outcome == "submitted" else record.message
        table.add_row(
            record.job,
            record.submission_id,
            record.outcome + (" (manual)" if record.trigger == "manual" else ""),
            record.status or "-",
            record.fired_at[:19].replace("T", " "),
            note,
        )
    return table


@schedule_app.command("status")
def schedule_status(
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    limit: Annotated[int, typer.Option(help="How many submissions to show.")] = 20,
    refresh: Annotated[
        bool, typer.Option(help="Ask the Ray Jobs API for the status of unfinished runs.")
    ] = True,
) -> None:
    """Scheduled submissions of this workdir, newest first, with their Ray Job status."""
    from pipelines.schedule import ScheduleError, ScheduleState, connect
    from pipelines.schedule import refresh as refresh_statuses

    config = _config(preset, sets)
    state = ScheduleState(config)
    records = state.history(limit)
    note = "as recorded"
    if refresh and records:
        try:
            client, address = connect(config)
            records = refresh_statuses(client, state)[:limit]
            note = f"status from {address}"
        except ScheduleError as exc:
            note = f"as recorded ({exc})"
    for name, job in config.schedule.jobs.items():
        through = state.handled_through(name)
        out.print(
            f"{name}: {job.cron} -> {' '.join(job.command)}"
            f"{'' if job.enabled else ' (disabled)'}; handled through "
            f"{through.isoformat()[:16] if through else '-'}"
        )
    out.print(
        _submissions_table(records, f"scheduled submissions in {config.paths.workdir} ({note})")
    )


@schedule_app.command("fire")
def schedule_fire(
    job: Annotated[str, typer.Argument(help="A schedule.jobs entry.")],
    preset: PresetOpt = "default",
    sets: SetOpt = None,
    at: Annotated[
        str | None,
        typer.Option(
            help="Logical date (ISO 8601; without an offset: schedule.timezone); default: now, "
            "to the minute. The same date again is refused as already submitted."
        ),
    ] = None,
    scheduled: Annotated[
        bool,
        typer.Option(
            help="The caller is a scheduler (a Kubernetes CronJob): the history records a "
            "scheduled slot, and the slot counts as handled."
        ),
    ] = False,
) -> None:
    """Submit one run of a scheduled job now (a backfill with --at). Exit 1 only when the
    submission failed; a refused duplicate or a slot skipped for a running one exit 0."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from pipelines.schedule import ConfigArgs, ScheduleState, connect, fire

    config = _config(preset, sets)
    if job not in config.schedule.jobs:
        typer.echo(
            f"error: no schedule job {job!r} (schedule.jobs: {', '.join(config.schedule.jobs)})",
            err=True,
        )
        raise typer.Exit(2)
    _check_schedule_commands(config)
    zone = ZoneInfo(config.schedule.timezone)
    try:
        slot = dt.datetime.fromisoformat(at) if at else dt.datetime.now(zone)
    except ValueError:
        typer.echo(f"error: --at must be ISO 8601, got {at!r}", err=True)
        raise typer.Exit(2) from None
    slot = (slot if slot.tzinfo else slot.replace(tzinfo=zone)).replace(second=0, microsecond=0)
    client, address = connect(config)
    record = fire(
        config,
        ConfigArgs(preset, tuple(sets or ())),
        job,
        slot,
        client=client,
        jobs_address=address,
        state=ScheduleState(config),
        trigger="schedule" if scheduled else "manual",
    )
    out.print(
        f"{record.submission_id}: {record.outcome}"
        f"{f' ({record.status})' if record.status else ''}"
        f"{f' - {record.message}' if record.outcome != 'submitted' and record.message else ''}"
    )
    if record.outcome == "failed":
        raise typer.Exit(1)


@config_app.command("show")
def config_show(preset: PresetOpt = "default", sets: SetOpt = None) -> None:
    """Print the fully resolved configuration as YAML."""
    config = load_config(preset, sets or [])
    typer.echo(config.to_yaml(), nl=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting (tests call it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RAYREC_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        # Without standalone mode, click *returns* a typer.Exit's code instead of raising.
        code = command.main(args=args, prog_name="rayrec", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            return code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        # Usage errors (unknown option, bad value): Typer's own message and exit code 2.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except RayrecError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:
        if debug:
            raise
        cause = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(
            f"error: {type(exc).__name__}: {cause} (rerun with --debug for the traceback)", err=True
        )
        return 1
    return 0


def entrypoint() -> None:
    sys.exit(main())
