"""``madloop``: run studies of self-consuming generative models from the command line."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

EPILOG = """examples:
  madloop run                                          the study in ./params.yaml
  madloop run --set loop.generations=2 --set train.epochs=2
  madloop run --set lineages=[mle] --lineage mle       one lineage of the study
  madloop show                                         the table of finished generations (on disk)
  madloop show ui                                      the same for study "ui", however it was run
  madloop verify                                       its files against their manifests and git's last commit
  madloop params --set data.imbalance_ratio=10         validate and print the resolved params
  madloop study fig4 --set studies.fig4.seeds=100      a paper reproduction, smaller

Outputs: data/studies/<study>/ (DVC-tracked datasets and weights), reports/<study>/ (DVC metrics and plots),
MLflow runs in sqlite:///mlflow.db (make ui). A killed run resumes at its first unfinished generation."""


def add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, metavar="FILE",
                        help="params file (default: params.yaml in --root when it exists, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param by dotted key, value read as YAML (repeatable), "
                             "e.g. --set train.epochs=2 --set lineages=[mle]")
    parser.add_argument("--root", default=".", metavar="DIR",
                        help="project root: where data/, reports/ and mlflow.db live (default: .)")
    parser.add_argument("--debug", action="store_true",
                        help="on a failure, print the full traceback (default: one line saying what failed)")


def build_parser(studies: bool = True) -> argparse.ArgumentParser:
    """The command line. ``studies``: list the paper studies under ``madloop study`` (imports flows.studies, and
    with it torch and Prefect: only when that command is asked for, so --help and --version stay instant)."""
    parser = argparse.ArgumentParser(
        prog="madloop", description="Self-consuming generative model loops (MADness), MLE vs PLE, tracked with "
                                    "Prefect, DVC and MLflow.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"madloop {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run (or resume) a study: every lineage for loop.generations generations",
                              description="Run the self_consuming_loop flow for the study in params, resuming at "
                                          "the first unfinished generation of each lineage.")
    add_params_args(run)
    run.add_argument("--lineage", action="append", default=None, metavar="NAME",
                     help="run only this lineage of params.lineages (repeatable)")
    run.add_argument("--overwrite", action="store_true",
                     help="outputs made under other params are moved to .madloop/trash/ and redone "
                          "(without it, such outputs stop the run before any work)")
    run.add_argument("--quiet", action="store_true", help="no table at the end")
    run.add_argument("--force", action="store_true",
                     help="run even when the study's estimated memory or disk exceeds what this machine has "
                          "available (without it, such a study stops before any work, exit code 2)")
    run.add_argument("--wait", action="store_true",
                     help="when another run of the same study is in progress, wait for it to end instead of stopping "
                          "(exit code 2)")
    run.add_argument("--fan-out", default=None, metavar="TARGET",
                     help="run each lineage as its own flow run, all at once: on a Slurm work pool (e.g. slurm: each "
                          "lineage a Slurm job with its slurm params; this run submits and watches them) or a lineage "
                          "deployment's pool (e.g. lineage/gpu from prefect.yaml); needs PREFECT_API_URL on a cluster")

    show = commands.add_parser(
        "show", help="print the table of a study's finished generations, as they are on disk",
        description="Print every finished generation of the study's lineages as their manifests on disk record them, "
                    "whatever params made them; lineages made under other params than these (params file and --set) "
                    "are shown too, with the keys that differ. Recipes run over several seeds are summarised "
                    "(centre and 95%% interval per generation, by kind of quantity).")
    show.add_argument("study", nargs="?", default=None, help="the study (default: study.name in params)")
    add_params_args(show)

    verify = commands.add_parser(
        "verify", help="check a study's files against their manifests and against git's last commit of them",
        description="Check every data folder of the study (data/studies/<study>/): each manifest against its own "
                    "checksum and each file against the sha256 its manifest records (accidents), and each "
                    "generation against what the last git commit of its folder's .dvc file recorded (edits made "
                    "after that commit; tasks/integrity.py). Exit code 0: nothing wrong; 1: something is.")
    verify.add_argument("study", nargs="?", default=None, help="the study (default: study.name in params)")
    add_params_args(verify)

    params = commands.add_parser("params", help="validate params and print them resolved, as YAML")
    add_params_args(params)

    if studies:
        from flows.studies import STUDIES

        papers = {entry.name: entry.doc.rstrip(".") for entry in sorted(STUDIES.entries(), key=lambda e: e.obj.order)}
        study = commands.add_parser(
            "study", help=f"reproduce one of the paper's results: {', '.join(papers)} (CSV + PNG in reports/)",
            description="; ".join(f"{name}: {doc}" for name, doc in papers.items()) + ". Sizes come from "
                        "studies.<name> in params (e.g. --set studies.fig4.seeds=50 for a quick run).")
        study.add_argument("name", choices=[*papers, "results"],
                           help="the study; results re-renders reports/RESULTS.md from the studies' reports")
    else:
        study = commands.add_parser("study", help="reproduce one of the paper's results (CSV + PNG in reports/; "
                                                  "`madloop study --help` lists them)")
        study.add_argument("name")
    add_params_args(study)

    serve = commands.add_parser(
        "serve", help="serve the study on a schedule (cron or interval) until Ctrl-C",
        description="Serve the study as a Prefect deployment on a schedule; each run reads the params file and "
                    "--set overrides when it starts, and resumes like `madloop run`. Needs a Prefect server with "
                    "its scheduler: `prefect server start`, then PREFECT_API_URL (docs/scale-out.md).")
    add_params_args(serve)
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="cron schedule in UTC, e.g. '0 3 * * *' (03:00 every day)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    serve.add_argument("--lineage", action="append", default=None, metavar="NAME",
                       help="run only this lineage of params.lineages (repeatable)")
    serve.add_argument("--fan-out", nargs="?", const="lineage/served", default=None, metavar="DEPLOYMENT",
                       help="run each lineage as its own flow run, in parallel: alone, this process serves them; "
                            "with a lineage deployment (lineage/gpu from prefect.yaml), its work pool's workers do; "
                            "with a Slurm work pool (slurm), each is a Slurm job")
    serve.add_argument("--name", default=None, help="deployment name (default: the study name)")
    return parser


def resolve_params_file(args) -> Path | None:
    if args.params is not None:
        return Path(args.params)
    default = Path(args.root) / "params.yaml"
    return default if default.is_file() else None


def cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def print_table(p, rows: list[dict], lineages=None) -> None:
    """The per-generation table; when recipes ran over several seeds, their centre and 95% interval per generation
    instead (the per-seed rows are in reports/<study>/generations.csv)."""
    from rich.console import Console
    from rich.table import Table

    from tasks.reports import recipe_metrics, recipe_summary, seeded, summary_columns, title, with_interval

    recipes = recipe_summary(p, rows, lineages or p.lineages)
    if seeded(recipes):
        metrics = [c for c in summary_columns(p) if c in recipe_metrics(p, rows)]
        table = Table(title="madloop: recipes per generation, centre [95% interval] over seeds (by kind of quantity)")
        for heading in ["recipe", "gen", "seeds", *map(title, metrics)]:
            table.add_column(heading, justify="left" if heading == "recipe" else "right")
        for e in recipes:
            table.add_row(e["recipe"], str(e["generation"]), str(e["seeds"]), *(with_interval(e, m) for m in metrics))
        Console().print(table)
        print(f"({len(rows)} rows of single seeds: reports/{p.study.name}/generations.csv)")
        return
    table = Table(title="madloop: metrics per generation (model k's samples vs held-out real data)")
    columns = [(key, title(key)) for key in ["lineage", "generation", *summary_columns(p)]]
    for key, heading in columns:
        table.add_column(heading, justify="left" if key == "lineage" else "right")
    for row in rows:
        table.add_row(*(cell(row.get(key)) for key, _ in columns))
    Console().print(table)


def experiment_link(p, root: Path) -> str:
    """The study's experiment in the MLflow UI (``make ui``), in MLflow 3's model-training view."""
    from tasks.tracking import client_for, experiment_url, tracking_uri, ui_address

    uri = tracking_uri(p.tracking.uri, root)
    experiment = client_for(uri).get_experiment_by_name(p.experiment)
    return experiment_url(uri, experiment.experiment_id) if experiment else ui_address(uri)


def paper_studies() -> list[str]:
    """The paper studies' names, which a study run from the command line may not take (tasks.resume.check_names)."""
    from flows.studies import STUDIES

    return STUDIES.names()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("madloop")
    except PackageNotFoundError:
        return "unknown (not installed)"


def show(p, root: Path, study: str | None) -> int:
    """``madloop show [STUDY]``: what is on disk, and how it differs from these params."""
    from tasks.layout import StudyPaths
    from tasks.reports import params_on_disk, study_on_disk
    from tasks.resume import manifests
    from tasks.storage import read_manifest

    if study is not None and study != p.study.name:
        p = p.model_copy(update={"study": p.study.model_copy(update={"name": study})})
    paths = StudyPaths(root, p.study.name)
    rows, lineages, notes = study_on_disk(p, paths)
    if not rows:
        print(f"madloop: no finished generations of study {p.study.name!r} under {paths.data}", file=sys.stderr)
        return 1
    first = next(manifests(paths.lineage(lineages[0].name)))[1]
    print_table(params_on_disk(p, read_manifest(first).get("recipe", {})), rows, lineages)
    for note in notes:
        print(f"note: {note}")
    return 0


def verify(root: Path, study: str) -> int:
    """``madloop verify [STUDY]``: one line per data folder, then its problems and notes; exit code 1 on a problem."""
    from tasks.integrity import verify_study
    from tasks.layout import StudyPaths

    data = StudyPaths(root, study).data
    reports = verify_study(root, data)
    if not reports:
        print(f"madloop: no data of study {study!r} under {data}", file=sys.stderr)
        return 1
    for report in reports:
        what = "the real data" if report.folder.name == "real" else f"{report.generations} generation(s)"
        against = f"; committed: {report.commit.describe()}" if report.commit else ""
        print(f"{report.folder.relative_to(root)}: {what} verified{against}")
        for problem in report.problems:
            print(f"  problem: {problem}")
        for note in report.notes:
            print(f"  note: {note}")
    problems = sum(len(r.problems) for r in reports)
    print(f"study {study!r}: " + (f"{problems} problem(s)" if problems else "nothing differs from what was made")
          + " (manifests check accidents; a commit of each folder's .dvc file is what checks edits)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input or the study is locked by another run (nothing was done), 1 a failure while
    working (one line; ``--debug`` for the traceback), 130 interrupted (Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(studies="study" in argv).parse_args(argv)
    import warnings

    from tasks.lock import StudyLockedError

    if not args.debug:  # "madloop: <what happened>", not the source line that warned
        warnings.formatwarning = lambda message, category, *_: f"madloop: {category.__name__}: {message}\n"
    from tasks.params import ParamsError

    try:
        return run_command(args)
    except (ParamsError, StudyLockedError) as err:
        print(f"madloop: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("madloop: interrupted; the next run resumes at the first unfinished generation", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"madloop: {one_line(err)} (--debug prints the traceback)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An error as one line: madloop's own errors say everything in their message; others are named."""
    text = (str(err).strip().splitlines() or [""])[0]
    ours = type(err).__module__.split(".")[0] in ("tasks", "flows", "models")
    return text if ours and text else f"{type(err).__name__}: {text}" if text else type(err).__name__


def quiet_tracebacks() -> None:
    """Prefect's console log shows failures without their tracebacks (they still reach the Prefect API's log);
    ``--debug`` keeps them."""
    import logging

    def strip(record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            record.msg, record.args = record.getMessage(), None
            record.exc_info, record.exc_text = None, None
        return True

    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.addFilter(strip)
    # MLflow logs every database error it re-raises, traceback and all; madloop retries what is worth retrying and
    # names what is not in one line (tasks.tracking.store_problem)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def run_command(args) -> int:
    root = Path(args.root).resolve()
    if args.command == "run" or (args.command == "study" and args.name != "results"):
        from flows.server import launch_temporary_server

        # launched first, it starts up (about 2.5 s of wall on 2 cores) while params are validated and the study is
        # opened; it is stopped on any error, bad params included
        server = launch_temporary_server()
        try:
            return run_or_study(args, load_params(args), root, server)
        finally:
            if server is not None:
                server.stop()
    p = load_params(args)
    if args.command == "params":
        import yaml

        print(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command == "show":
        return show(p, root, args.study)
    if args.command == "verify":
        return verify(root, args.study or p.study.name)
    if args.command == "study" and args.name == "results":
        from flows.studies import write_results

        print(f"wrote {write_results(root)}")
        return 0
    return run_or_study(args, p, root, None)


def load_params(args):
    from tasks.params import load

    # the paper studies' settings (studies.<name>) are checked only for `madloop study`; the other commands take
    # them as they are (tasks.params.schema)
    return load(resolve_params_file(args), args.overrides, studies=args.command == "study")


def run_or_study(args, p, root: Path, server) -> int:
    from flows.server import prefect_api

    import flows.loop  # noqa: F401  (configures Prefect's logging)

    if not args.debug:
        quiet_tracebacks()
    if args.command == "study":
        from flows.studies import run as run_paper_study

        with prefect_api(server):
            timing = run_paper_study(args.name, p, root)
        print(f"{args.name}: finished in {timing['seconds']} s ({timing['machine']}); see reports/{args.name}/")
        return 0
    if args.command == "serve":
        from flows.deploy import serve_study

        serve_study(p, resolve_params_file(args), args.overrides, root, cron=args.cron, interval=args.interval,
                    lineages=args.lineage, fan_out_to=args.fan_out, name=args.name, paper_studies=paper_studies())
        return 0
    from flows.loop import run_study

    started = time.perf_counter()
    from tasks.progress import terminal_bars

    with terminal_bars(not args.quiet):
        rows = run_study(p, root, args.lineage, args.overwrite, wait=args.wait, api=lambda: prefect_api(server),
                         force=args.force,
                         on_wait=lambda line: print(f"madloop: {line}", file=sys.stderr, flush=True),
                         lineage_deployment=args.fan_out, paper_studies=paper_studies())
    if not args.quiet:
        print_table(p, rows)
        print(f"\nfinished in {time.perf_counter() - started:.0f} s. Compare the lineages:\n"
              f"  make ui            MLflow, experiment {p.experiment!r}:\n"
              f"    {experiment_link(p, root)}\n"
              f"  dvc plots show     metrics per generation and recipe (dvc_plots/index.html)\n"
              f"  dvc metrics show   each lineage's last generation")
    return 0


def console() -> None:
    """The ``madloop`` command: :func:`main`, then a prompt exit. After a study the interpreter's own teardown
    (freeing every module and object one by one) took 2.2 s of a 1-D study's 29 s on this 2-core VM (the
    cheap-generations study, timed around main and to the process's end), after the last byte was written. So the
    exit handlers run (logging, Prefect's and MLflow's), output is flushed, and the process ends. Every file madloop
    writes is closed (and renamed into place) before main returns, so nothing is lost; in-process callers (the
    tests) use main."""
    import atexit
    import os
    import threading

    code = main()
    for thread in threading.enumerate():  # what a normal exit does first: wait for the non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # then the exit handlers; the teardown after them is what this skips
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
