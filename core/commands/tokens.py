"""`python -m core tokens`: the token view of one question of a run (docs/method.md section 8)."""

from __future__ import annotations

import argparse

from core.jobs import TOKEN_VIEW_EDGES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokens", help="per answer token, each model's part of the edges that changed most (one "
                       "question of a run)",
        description="For the --k edges whose mean |W| changed most from the base to the post model "
                    "(mean|W_post| - mean|W_base| over the run's questions at --alpha), scores the "
                    "question's answer of each model again (its own answer, cut at the run's T_cut "
                    "for alpha, the run's score settings, the model loaded from the spec the run "
                    "recorded) with each answer position apart: per edge, the first token's part, "
                    "the rest of the prompt's and one term per answer token; they sum to W. Stores "
                    "the view in the cache (table token_views), where the Samples page shows it.")
    parser.add_argument("--run", required=True, help="run key (`python -m core ls` lists them)")
    parser.add_argument("--alpha", required=True, type=float, help="one of the run's alphas")
    parser.add_argument("--question", required=True, help="question id, as the Samples page shows it")
    parser.add_argument("--post", help="post model label (default: the run's first)")
    parser.add_argument("--k", type=int, default=TOKEN_VIEW_EDGES,
                        help=f"edges shown, the most changed first (default: {TOKEN_VIEW_EDGES})")
    parser.add_argument("--cache", help="cache file (default: $CIRCUITDIFF_CACHE, else "
                                        "cache/circuitdiff.duckdb)")
    parser.add_argument("--device", help="torch device (default: the run's score settings')")
    parser.add_argument("--job-id", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core import jobs
    from core.store import Store

    reporter = jobs.JobReporter(jobs.token_view_status_path(args.job_id, args.cache)) \
        if args.job_id else None
    try:
        if reporter:
            reporter.running()
        from core.tokens import run_token_view

        view = run_token_view(Store(args.cache), args.run, args.alpha, args.question, args.post,
                              args.k, args.device, progress=reporter.progress if reporter else None)
    except BaseException as error:
        if reporter:
            reporter.finish("failed", f"{type(error).__name__}: {error}")
        raise
    summary = (f"token view of question {view['question_id']} ({view['post_label']} vs base, "
               f"alpha {view['alpha']:g}, {len(view['edges'])} edges) stored")
    print(f"{summary} in {Store(args.cache).path}")
    if reporter:
        reporter.finish("done", summary)
    return 0
