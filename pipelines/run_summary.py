"""The final summary of a pipeline run: headline quality, timings per step, where things are.

Logged on the MLflow parent run (``summary.json``, ``summary.md``) and written
beside the run records (``<workdir>/runs/summaries/<run_id>.json``), so someone
browsing MLflow or the workdir sees in one place what the run produced without
opening each child run. The quality table takes a fixed list of headline
metrics (:data:`HEADLINES`), each from the step that reports it; a skipped
step's numbers come from its published manifest, so a resumed run still
shows the whole picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the runner imports this module to write the summary
    from pipelines.runner import RunRecord


@dataclass(frozen=True)
class Headline:
    """One row of the quality table: ``metric`` of ``step``, shown as ``label``."""

    label: str
    step: str
    metric: str


HEADLINES: tuple[Headline, ...] = (
    Headline("retrieval Recall@10 (test)", "train_retrieval", "retrieval_recall_at_10"),
    Headline("retrieval NDCG@10 (test)", "train_retrieval", "retrieval_ndcg_at_10"),
    Headline("most-popular Recall@10 (test)", "train_retrieval", "popularity_recall_at_10"),
    Headline("index recall@100 vs exact", "index", "index_recall_at_100"),
    Headline("reranker AUC (test)", "train_ranker", "ranker_test_auc"),
    Headline("reranker GAUC (test)", "train_ranker", "ranker_test_gauc"),
    Headline("reranker logloss (test)", "train_ranker", "ranker_test_logloss"),
    Headline("reranker ECE (test, calibrated)", "train_ranker", "ranker_test_ece"),
    Headline("logistic regression AUC (test)", "train_ranker", "ranker_logistic_test_auc"),
    Headline("fine-tuned AUC (window holdout)", "finetune_ranker", "finetune_auc"),
    Headline("base AUC (window holdout)", "finetune_ranker", "finetune_base_auc"),
    Headline(
        "two-stage NDCG@10 retrieval order", "evaluate_two_stage", "two_stage_retrieval_ndcg_at_10"
    ),
    Headline("two-stage NDCG@10 reranked", "evaluate_two_stage", "two_stage_reranked_ndcg_at_10"),
    Headline(
        "two-stage true NDCG@10 retrieval order",
        "evaluate_two_stage",
        "two_stage_retrieval_true_ndcg_at_10",
    ),
    Headline(
        "two-stage true NDCG@10 reranked",
        "evaluate_two_stage",
        "two_stage_reranked_true_ndcg_at_10",
    ),
    Headline("monitor findings (newest window)", "monitor", "monitor_findings"),
)


def run_summary(record: RunRecord, links: dict[str, str] | None = None) -> dict[str, Any]:
    """``{run, pipeline, status, total_s, quality: [...], steps: [...], links}`` of ``record``.

    ``quality`` holds the :data:`HEADLINES` the run's steps reported (others are
    left out: a table without time has no two-stage step's numbers, say);
    ``steps`` each step's status, seconds, version and row counts; ``total_s``
    the seconds of the steps that ran (skipped steps cost nothing).
    """
    by_name = {step.name: step for step in record.steps}
    quality = [
        {
            "metric": h.label,
            "step": h.step,
            "key": h.metric,
            "value": by_name[h.step].metrics[h.metric],
        }
        for h in HEADLINES
        if h.step in by_name and h.metric in by_name[h.step].metrics
    ]
    steps = [
        {
            "step": s.name,
            "status": s.status,
            "seconds": round(s.duration_s, 2),
            "version": s.version,
            "rows": s.row_counts,
            **({"error": s.error} if s.error else {}),
        }
        for s in record.steps
    ]
    return {
        "run": record.run_id,
        "pipeline": record.pipeline,
        "preset": record.preset,
        "status": record.status,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "total_s": round(sum(s.duration_s for s in record.steps if s.status == "ran"), 2),
        "quality": quality,
        "steps": steps,
        "links": dict(links or {}),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown (MLflow shows ``.md`` artifacts rendered)."""
    lines = [
        f"# {summary['pipeline']} run {summary['run']}: {summary['status']}",
        "",
        f"Preset `{summary['preset']}`, {summary['total_s']:.1f} s of steps that ran.",
        "",
        "## Quality",
        "",
        "| metric | value | step |",
        "|---|---:|---|",
        *(f"| {q['metric']} | {q['value']:.4f} | {q['step']} |" for q in summary["quality"]),
        "",
        "## Steps",
        "",
        "| step | status | seconds | version |",
        "|---|---|---:|---|",
        *(
            f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['version'] or '-'} |"
            for s in summary["steps"]
        ),
    ]
    if summary["links"]:
        lines += ["", "## Links", "", *(f"- {k}: {v}" for k, v in summary["links"].items())]
    return "\n".join(lines) + "\n"
