"""The command line: parse, load config, call one service function, render.

Exit codes: 0 all done; 1 finished with dead letters or rejects; 2 bad usage, config or
input; 3 stopped by a fatal API condition; 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wecomctl import config as cfg
from wecomctl.errors import EXIT_DEAD, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, StoreError, WecomctlError

app = typer.Typer(
    help="Add campaign leads as WeCom customers and send the welcome, under WeCom's rate limits.\n\n"
    "Example: wecomctl import leads.csv --campaign spring; wecomctl run; wecomctl status  (import exits 1 when it rejected rows)",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dlq_app = typer.Typer(help="Inspect dead letters. Example: wecomctl dlq list --stage add", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
store_app = typer.Typer(help="Move a campaign's data between stores. Example: wecomctl store copy --from .wecomctl --to redis://127.0.0.1:6379/0",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")

# soft_wrap: long paths and messages stay on one line in logs and pipes.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Config file (default ./wecomctl.yaml if present, else built-in defaults).")
DataDirOpt = typer.Option(None, "--data-dir", "-d", help="Data directory (default ./.wecomctl).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")
StoreOpt = typer.Option(None, "--store", envvar="WECOMCTL_STORE",
                        help="The queue: a redis://host:port/db URL shared by several machines (default: run.store, else the data dir).")


def _fail(exc: WecomctlError) -> None:
    # Messages hold file names, URLs and cells: text, never rich markup ("leads[1].csv").
    err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _settings(config: Optional[str], data_dir: Optional[str], store: Optional[str] = None) -> cfg.Settings:
    return cfg.load(config, data_dir, store)


def _log_spec(level: str, fmt: str, file: Optional[str], show_phones: bool) -> dict:
    from wecomctl import logs

    if level.upper() not in logs.LEVELS:
        raise WecomctlError(f"--log-level must be one of {', '.join(logs.LEVELS)}, not {level!r}")
    if fmt not in logs.FORMATS:
        raise WecomctlError(f"--log-format must be text or json, not {fmt!r}")
    if file:
        try:
            open(file, "a", encoding="utf-8").close()
        except OSError as exc:
            raise WecomctlError(f"cannot write the log file {file}: {exc.strerror or exc}") from None
    spec = {"level": level.upper(), "fmt": fmt, "file": file, "mask_phones": not show_phones}
    logs.setup(**spec)
    return spec


# --- import -----------------------------------------------------------------------------
class _ImportProgress:
    """A progress line for imports that take more than a second (on a terminal only, on
    stderr, gone when done; logs get the summary)."""

    def __init__(self, console: Console):
        import time

        self.console, self.start, self.live, self.task = console, time.monotonic(), None, None

    def __enter__(self):
        return self

    def update(self, path: str, rows: int) -> None:
        import time

        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if not self.console.is_terminal or time.monotonic() - self.start < 1.0:
            return
        if self.live is None:
            self.live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
            self.live.start()
            self.task = self.live.add_task("")
        self.live.update(self.task, description=f"importing {path}: {rows:,} rows read")

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()
        return False


@app.command("import")
def import_cmd(
    files: List[str] = typer.Argument(..., help="Lead files: CSV/TSV/TXT, JSON, JSONL, XLSX."),
    campaign: str = typer.Option(None, "--campaign", help="Campaign name (required)."),
    owner: Optional[str] = typer.Option(None, "--owner", help="Staff userid for leads with no owner: no owner column, or an empty owner cell."),
    encoding: Optional[str] = typer.Option(None, "--encoding", help="Override the detected encoding (e.g. gb18030)."),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help="Override the detected delimiter."),
    phone_column: Optional[str] = typer.Option(None, "--phone-column", help="Header of the phone column."),
    name_column: Optional[str] = typer.Option(None, "--name-column", help="Header of the name column."),
    owner_column: Optional[str] = typer.Option(None, "--owner-column", help="Header of the owner column."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and report; enqueue nothing."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt, as_json: bool = JsonOpt,
):
    """Read lead files, normalise phones to E.164, dedupe and enqueue. Never calls WeCom.

    Example: wecomctl import leads.csv more.xlsx --campaign spring --owner zhangsan
    """
    from wecomctl.ingest.importer import Importer
    from wecomctl.ingest.readers import ReadOptions
    from wecomctl.pipeline.worker import open_store

    try:
        if not campaign:
            raise WecomctlError("--campaign is required (for example: wecomctl import leads.csv --campaign spring)")
        s = _settings(config, data_dir, store)
        for f in files:
            if os.path.isdir(f):
                raise WecomctlError(f"{f} is a directory; pass the lead files in it")
            if not os.path.exists(f):
                raise WecomctlError(f"file not found: {f}")
            if not os.path.isfile(f):
                # A file is read twice (sniffed, then streamed) and sized for the reader
                # process: a pipe or a device cannot be.
                raise WecomctlError(f"{f} is not a regular file (a pipe or a device): save the leads to a file "
                                    "first, e.g. `cat … > leads.csv`")
        if dry_run:
            # Read what the campaign already holds, if anything; never create a store.
            try:
                store = open_store(s, create=False)
            except StoreError:
                store = None
        else:
            store = open_store(s)
        opts = ReadOptions(encoding=encoding, delimiter=delimiter, phone_column=phone_column,
                           name_column=name_column, owner_column=owner_column)
        # A dry run leaves the data dir alone, but the operator still needs to see which
        # rows are bad: its reports go to the system's temporary directory.
        reports = tempfile.gettempdir() if dry_run else os.path.join(s.data_dir, "rejects")
        imp = Importer(store, campaign, owner=owner, staff=s.staff_for(campaign.strip()), options=opts,
                       rejects_dir=reports, dry_run=dry_run,
                       template=s.welcome_for(campaign.strip()).text, data_dir=s.data_dir)
        try:
            with _ImportProgress(err) as progress:
                imp.on_progress = progress.update
                report = imp.run(files)
        except KeyboardInterrupt:
            err.print("interrupted: the leads read so far are queued; run the same import again to finish "
                      "(what is already queued is skipped as a duplicate)")
            raise typer.Exit(EXIT_INTERRUPTED)
        if store:
            store.close()
    except WecomctlError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(report.as_json(), ensure_ascii=False))
    else:
        cols = ("file", "format", "encoding", "delimiter", "accepted", "rejected", "duplicates", "blank", "revived")
        rows = [(f.path, f.format, f.encoding or "", repr(f.delimiter) if f.delimiter else "", str(f.accepted),
                 str(f.rejected), str(f.skipped), str(f.blank), str(f.revived)) for f in report.files]
        if out.is_terminal:
            t = Table(title=escape(f"import {report.campaign}{' (dry run)' if dry_run else ''}"))
            for col in cols:
                t.add_column(col)
            for row in rows:
                t.add_row(*map(escape, row))
            out.print(t)
        else:  # logs and pipes: one whole line per file, nothing cut to fit a width
            for row in rows:
                out.print(" ".join(f"{c}={v}" for c, v in zip(cols, row)), highlight=False, markup=False)
        for reason, n in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
            out.print(f"  rejected {n}: {reason}", markup=False)
        for f in report.files:
            if f.title_rows:
                out.print(f"  {f.path}: {f.title_rows} title row(s) above the header skipped", markup=False)
            if f.nul_rows:
                out.print(f"  {f.path}: NUL bytes removed from {f.nul_rows} rows (a damaged export?)", markup=False)
        if report.revived:
            out.print(f"{report.revived} fixed rows replaced their dead letters and are queued again", markup=False)
        if report.rejects_file:
            out.print(f"rejects written to {report.rejects_file}", markup=False)
        if report.duplicates_file:
            out.print(f"duplicates (with the row each matched) written to {report.duplicates_file}", markup=False)
    raise typer.Exit(EXIT_DEAD if report.rejected else EXIT_OK)


# --- run --------------------------------------------------------------------------------
@app.command()
def run(
    workers: int = typer.Option(0, "--workers", "-w", min=0, help="Worker processes (default: run.workers, else CPU count)."),
    until_empty: bool = typer.Option(True, "--until-empty/--forever", help="Stop when every queue is drained (default), or keep running."),
    progress_interval: Optional[float] = typer.Option(None, "--progress-interval", min=0.1, help="Seconds between plain progress lines when stdout is not a terminal."),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO (one line per failed call), WARNING or ERROR."),
    log_format: str = typer.Option("text", "--log-format", help="text, or json: one object a line with ts, level, campaign, stage, lead, errcode."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Append logs to this file instead of stderr (all processes)."),
    show_phones: bool = typer.Option(False, "--log-phones", help="Write whole phone numbers in logs (masked as +86138****8000 by default)."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt, as_json: bool = JsonOpt,
):
    """Add every queued lead and send the welcome, under the configured rate limits.

    Example: wecomctl run --config wecomctl.yaml --workers 4 --log-format json --log-file run.log
    """
    from wecomctl.pipeline import pool
    from wecomctl.report.progress import make_progress

    try:
        log_spec = _log_spec(log_level, log_format, log_file, show_phones)
        s = _settings(config, data_dir, store)
        n = workers or s.run.workers or os.cpu_count() or 1
        interval = progress_interval if progress_interval is not None else s.run.progress_interval_s
        # With --json, stdout carries only the JSON; progress goes to stderr.
        prog = make_progress(err if as_json else out, interval, s)
        with prog:
            result = pool.run(s, n, until_empty, on_tick=prog.tick, log_spec=log_spec)
            prog.tick(result.counts, result.elapsed, final=True)
    except WecomctlError as exc:
        _fail(exc)
    _print_run_summary(result, as_json)
    raise typer.Exit(result.exit_code)


def _print_run_summary(result, as_json: bool) -> None:
    from wecomctl.report.progress import totals

    rows, this = totals(result.counts), result.this_run
    if as_json:
        print(json.dumps({"exit_code": result.exit_code, "elapsed_s": round(result.elapsed, 3),
                          "this_run": this, "stages": rows, "fatal": result.fatal,
                          "worker_errors": result.worker_errors}, ensure_ascii=False))
    else:
        a, w, b = rows["add"], rows["welcome"], rows["writeback"]
        queued = sum(r[k] for r in (a, w, b) for k in ("ready", "delayed", "leased"))
        written = f", written back {b['done']}" if b["entered"] else ""
        out.print(f"run finished in {result.elapsed:.1f}s: this run added {this['added']}, welcomed {this['welcomed']}, "
                  f"dead-lettered {this['dead']}; in all: added {a['done']}, welcomed {w['done']}{written}, "
                  f"dead {a['dead'] + w['dead'] + b['dead']}, still queued {queued}", highlight=False, markup=False)
    # What needs a person's attention goes to stderr, with or without --json.
    if result.fatal:
        todo = result.fatal.get("todo")
        err.print(f"[red]stopped:[/] {escape(result.fatal['error'])}{escape(f' — {todo}') if todo else ''}. "
                  "Fix it, then run again; the items are still queued.", highlight=False)
    if result.interrupted and result.forced:
        err.print("stopped at once (second signal): calls in flight were cut off; their items go back to the "
                  "queue when the next run starts. Run again to continue.")
    elif result.interrupted:
        err.print("interrupted: in-flight calls were finished and recorded; run again to continue.")
    for e in result.worker_errors:
        err.print(f"[yellow]warning:[/] {escape(str(e))}")


# --- status / export / dlq ----------------------------------------------------------------
def _open_existing(config, data_dir, store=None, campaign: Optional[str] = None):
    """The settings and the existing store; with `campaign`, that it is in the store (a
    typo would otherwise list, export or move nothing and look like success)."""
    from wecomctl.pipeline.worker import open_store
    from wecomctl.store import redact_url

    s = _settings(config, data_dir, store)
    opened = open_store(s, create=False)
    if campaign is not None and campaign not in opened.campaigns():
        where = s.run.store and redact_url(s.run.store) or s.data_dir
        known = ", ".join(opened.campaigns()) or "none"
        opened.close()
        raise WecomctlError(f"no campaign {campaign!r} in {where} (campaigns: {known})")
    return s, opened


def status_data(counts: dict, campaign: Optional[str]) -> dict:
    from wecomctl.report.progress import totals

    picked = {c: v for c, v in counts.items() if campaign is None or c == campaign}
    stages = totals(picked)
    return {
        "imported": sum(c["imported"] for c in picked.values()),
        "skipped": sum(c["skipped"] for c in picked.values()),
        "stages": stages,
        "campaigns": picked,
    }


@app.command()
def status(
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign."),
    watch: bool = typer.Option(False, "--watch", help="Redraw every --interval seconds until Ctrl-C."),
    interval: float = typer.Option(5.0, "--interval", min=0.5, help="Seconds between redraws with --watch."),
    prometheus: Optional[str] = typer.Option(None, "--prometheus", help="Also write the figures to FILE in the Prometheus text format (atomically; for node_exporter's textfile collector)."),
    check_alerts: bool = typer.Option(False, "--check", help="Exit 1 when an alert threshold (alerts: in the config) is crossed; 0 otherwise."),
    notify: bool = typer.Option(False, "--notify", help="Send the alerts in force to the group robot (deduplicated and rate-limited)."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt, as_json: bool = JsonOpt,
):
    """Queue depths per stage and state, error rate and throughput over 5 minutes, the age of
    the oldest waiting item, dead letters by errcode, pauses and alerts.

    Example: wecomctl status --json;  from cron: wecomctl status --check --notify --prometheus /var/lib/node_exporter/wecomctl.prom
    """
    import time

    from wecomctl.report import health
    from wecomctl.report.notify import Notifier

    try:
        s, store = _open_existing(config, data_dir, store, campaign)
        if notify and not s.robot_key():
            err.print(f"warning: --notify sends nothing: no robot key (set ${s.alerts.robot_key_env or 'WECOMCTL_ROBOT_KEY'} "
                      "to the key= part of the group robot's webhook URL)", markup=False)
        while True:
            data = health.snapshot(store, s, time.time(), campaign)
            if prometheus:
                try:
                    health.write_atomic(prometheus, health.prometheus(data))
                except OSError as exc:
                    raise WecomctlError(f"cannot write {prometheus}: {exc.strerror or exc}") from None
            if notify:
                alerts = [health.Alert(a["key"], a["text"]) for a in data["alerts"]]
                data["notified"] = [a.key for a in Notifier(s, store, time.time).notify(alerts, campaign or "")]
            if as_json:
                print(json.dumps(data, ensure_ascii=False), flush=True)
            else:
                if watch and out.is_terminal:
                    out.clear()
                _print_status(data)
            if not watch:
                break
            time.sleep(interval)
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK)
    if check_alerts and data["alerts"]:
        raise typer.Exit(EXIT_DEAD)


def _print_status(data: dict) -> None:
    import time

    stamp = time.strftime("%H:%M:%S", time.localtime(data["at"]))
    out.print(f"[{stamp}] imported {data['imported']}, duplicates skipped at import {data['skipped']}", highlight=False,
              markup=False)
    cols = ("ready", "delayed", "leased", "done", "dead", "skipped", "entered")
    rows = []
    for camp, c in data["campaigns"].items():
        for stage, row in c["stages"].items():
            if stage == "writeback" and not row["entered"]:
                continue
            rate = "-" if row["error_rate_5m"] is None else f"{row['error_rate_5m']:.0%}"
            age = "-" if row["oldest_ready_s"] is None else f"{row['oldest_ready_s']:.0f}s"
            rows.append((camp, stage, *[str(row[c]) for c in cols], rate, f"{row['per_minute']:.1f}", age))
    heads = ("campaign", "stage", *cols, "err_5m", "done_per_min", "oldest_wait")
    if out.is_terminal and out.width >= 120:  # the table needs the room; lines never cut a number
        t = Table(title="queues")
        for i, h in enumerate(heads):
            t.add_column(h.replace("_", " "), justify="left" if i < 2 else "right")
        for r in rows:
            t.add_row(*map(escape, r))
        out.print(t)
    else:  # cron mail and logs: whole lines, nothing cut to fit a width
        for r in rows:
            out.print(" ".join(f"{h}={v}" for h, v in zip(heads, r)), highlight=False, markup=False)
    if data["dead_by_code"]:
        from wecomctl.report.export import describe

        out.print("dead letters by errcode: " + ", ".join(
            f"{code} ({describe(code)}) {n}" for code, n in sorted(data["dead_by_code"].items(), key=lambda kv: -kv[1])),
            highlight=False, markup=False)
    for api, left in data["pauses"].items():
        out.print(f"[yellow]paused:[/] {api} for {left:.0f}s more (WeCom answered 45009; every process waits)")
    for api, cap in data["caps"].items():
        out.print(f"[yellow]throttled:[/] {api} at most {cap} calls in flight (after 45033)")
    if data["fatal"]:
        err.print(f"[red]last run stopped:[/] {escape(data['fatal']['error'])}", highlight=False)
    for a in data["alerts"]:
        out.print(f"[red]alert:[/] {escape(a['text'].replace('**', ''))}", highlight=False)


@app.command()
def export(
    fmt: str = typer.Option("csv", "--format", "-f", help="csv or jsonl."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="File to write (atomically); default stdout."),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign."),
    status_: Optional[str] = typer.Option(None, "--status", help="Only leads in these states, comma-separated: welcomed, already_welcomed, dead, in_progress."),
    mask_phones: bool = typer.Option(False, "--mask-phones", help="Write phones as +86138****8000 (for sharing the file)."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt,
):
    """One row per lead: phone, owner, external_userid, overall and per-stage status, error.

    Example: wecomctl export --status dead --mask-phones -o dead.csv
    """
    from wecomctl.report.export import STATUSES, export as do_export, mask, result_row

    wanted = {x.strip() for x in status_.split(",") if x.strip()} if status_ else None

    def rows(leads):
        for lead in leads:
            row = result_row(lead)
            if wanted and row["status"] not in wanted:
                continue
            if mask_phones:
                row["phone"] = mask(row["phone"])
            yield row

    try:
        if fmt not in ("csv", "jsonl"):
            raise WecomctlError(f"--format must be csv or jsonl, not {fmt!r}")
        if wanted and wanted - set(STATUSES):
            raise WecomctlError(f"--status takes {', '.join(STATUSES)}; not {', '.join(sorted(wanted - set(STATUSES)))}")
        s, store = _open_existing(config, data_dir, store, campaign)
        n = do_export(rows(store.leads(campaign)), fmt, output)
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    if output and output != "-":
        err.print(f"exported {n} leads to {output}", markup=False)


@app.command("retry-dlq")
def retry_dlq(
    stage: Optional[str] = typer.Option(None, "--stage", help="add, welcome or writeback (default all)."),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign."),
    errcode: Optional[int] = typer.Option(None, "--errcode", help="Only dead letters with this errcode."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: ambiguous, config, dead, http, invalid, network, poison, retry, throttle, token, window."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Move at most this many."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would move; move nothing."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt, as_json: bool = JsonOpt,
):
    """Move dead letters back to ready, for transient causes (an outage, a raised quota, an
    ambiguous call you checked). To fix data (a wrong owner, a typo), re-import the fixed
    rows instead. The welcome ledger still prevents a second greeting.

    Example: wecomctl retry-dlq --kind network && wecomctl run
    """
    import time

    try:
        if stage not in (None, "add", "welcome", "writeback"):
            raise WecomctlError(f"--stage must be add, welcome or writeback, not {stage!r}")
        from wecomctl.report.export import DEAD_KINDS

        if kind is not None and kind not in DEAD_KINDS:
            raise WecomctlError(f"--kind must be one of {', '.join(DEAD_KINDS)}, not {kind!r}")
        s, store = _open_existing(config, data_dir, store, campaign)
        n = store.requeue_dead(stage, campaign, time.time(), errcode=errcode, limit=limit, dry_run=dry_run, kind=kind)
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"moved": 0 if dry_run else n, "would_move": n if dry_run else None}))
    else:
        out.print(f"{'would move' if dry_run else 'moved'} {n} dead letters back to ready"
                  f"{'; now run `wecomctl run`' if n and not dry_run else ''}", markup=False)


@app.command()
def check(store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt,
          as_json: bool = JsonOpt):
    """Verify the store: counters agree with the leads, no orphan lease, every lead in exactly
    one state per stage, the welcome ledger agrees with the results. Exit 1 if anything is wrong.

    Example: wecomctl check -d .wecomctl
    """
    try:
        s, store = _open_existing(config, data_dir, store)
        problems = store.check()
        counts = status_data(store.counts(), None)
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"ok": not problems, "problems": problems, "stages": counts["stages"],
                          "imported": counts["imported"]}, ensure_ascii=False))
    else:
        for p in problems:
            out.print(f"problem: {p}", highlight=False, markup=False)
        a = counts["stages"]["add"]
        out.print(f"{'FAILED' if problems else 'ok'}: {counts['imported']} imported; add done {a['done']}, "
                  f"dead {a['dead']}, queued {a['ready'] + a['delayed'] + a['leased']}; {len(problems)} problems",
                  highlight=False)
    raise typer.Exit(EXIT_DEAD if problems else EXIT_OK)


@dlq_app.command("list")
def dlq_list(
    stage: Optional[str] = typer.Option(None, "--stage", help="add, welcome or writeback."),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign."),
    errcode: Optional[int] = typer.Option(None, "--errcode", help="Only dead letters with this errcode."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt, as_json: bool = JsonOpt,
):
    """List dead letters: when, who, why (errcode, its meaning, what to do), attempts.

    Example: wecomctl dlq list --stage add --json
    """
    import time

    from wecomctl.report.export import dead_letters

    try:
        if stage not in (None, "add", "welcome", "writeback"):
            raise WecomctlError(f"--stage must be add, welcome or writeback, not {stage!r}")
        s, store = _open_existing(config, data_dir, store, campaign)
        rows = list(dead_letters(store.leads(campaign), stage, errcode))
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    # One dead letter a line (readable in a pipe or a log), then what to do once per reason.
    todo: dict[str, str] = {}
    for r in rows:
        code = r["errcode"] if r["errcode"] is not None else r["kind"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])) if r.get("at") else "-"
        out.print(f"{when} {r['campaign']} {r['stage']} {r['phone']} owner={r['owner'] or '-'} {code} "
                  f"({r['meaning'] or 'unknown'}) attempts={r['attempts']}: {r['error']}", highlight=False, markup=False)
        if r["todo"]:
            todo[f"{code} {r['meaning']}"] = r["todo"]
    out.print(f"{len(rows)} dead letters", highlight=False)
    for reason, what in todo.items():
        out.print(f"  {reason}: {what}", highlight=False, markup=False)


@dlq_app.command("export")
def dlq_export(
    output: str = typer.Option(..., "--output", "-o", help="File to write (atomically); - for stdout."),
    fmt: str = typer.Option("csv", "--format", "-f", help="csv (opens in Excel) or jsonl."),
    stage: Optional[str] = typer.Option(None, "--stage", help="add, welcome or writeback."),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign."),
    errcode: Optional[int] = typer.Option(None, "--errcode", help="Only dead letters with this errcode."),
    mask_phones: bool = typer.Option(False, "--mask-phones", help="Write phones as +86138****8000."),
    store: Optional[str] = StoreOpt, config: Optional[str] = ConfigOpt, data_dir: Optional[str] = DataDirOpt,
):
    """Write the dead letters to a file for a person to fix the data: who, errcode, what it
    means and what to do. Fix the rows, then import them again over their dead letters.

    Example: wecomctl dlq export -o to-fix.csv --stage add
    """
    from wecomctl.report.export import dead_letters, export as do_export, to_fix

    try:
        if fmt not in ("csv", "jsonl"):
            raise WecomctlError(f"--format must be csv or jsonl, not {fmt!r}")
        if stage not in (None, "add", "welcome", "writeback"):
            raise WecomctlError(f"--stage must be add, welcome or writeback, not {stage!r}")
        s, store = _open_existing(config, data_dir, store, campaign)
        columns, rows = to_fix(dead_letters(store.leads(campaign), stage, errcode), mask_phones)
        n = do_export(rows, fmt, output, columns)
        store.close()
    except WecomctlError as exc:
        _fail(exc)
    if output != "-":
        err.print(f"exported {n} dead letters to {output}", markup=False)


@store_app.command("copy")
def store_copy(
    source: str = typer.Option(..., "--from", help="A data dir, or a redis://host:port/db URL (?namespace=name)."),
    target: str = typer.Option(..., "--to", help="A new data dir, or a Redis URL/namespace holding no leads."),
    config: Optional[str] = ConfigOpt, as_json: bool = JsonOpt,
):
    """Copy every lead, its state, the welcome ledger and the counters from one store to
    another, e.g. from the embedded store to Redis when a campaign outgrows one machine
    (and back). Stop every run on the source first. Items that were waiting to retry or in
    flight are ready in the copy; an interrupted call is settled before it is made again.

    Example: wecomctl store copy --from .wecomctl --to redis://10.0.0.5:6379/0?namespace=spring
    """
    import time

    from wecomctl.report.progress import totals
    from wecomctl.store import is_redis_url, open_store as open_location, redact_url

    def shown(location: str) -> str:
        return redact_url(location) if is_redis_url(location) else location

    try:
        s = _settings(config, None)
        urls = "://" in source + target
        if (source == target) if urls else os.path.abspath(source) == os.path.abspath(target):
            raise WecomctlError("--from and --to are the same store")
        kw = {"max_attempts": s.retry.max_attempts, "max_deliveries": s.run.max_deliveries,
              "writeback": bool(s.writeback.url)}
        src = open_location(source, create=False, **kw)
        from wecomctl.pipeline.pool import HEARTBEAT_FRESH_S

        beat = src.get_flag("heartbeat")
        if beat and time.time() - beat["at"] < HEARTBEAT_FRESH_S:
            raise WecomctlError(f"a run is working on {shown(source)} (its last sign of life {time.time() - beat['at']:.0f}s "
                                f"ago, from {beat.get('by')}); stop every run on it, then copy "
                                f"(a run counts as stopped {HEARTBEAT_FRESH_S:.0f}s after its end)")
        if src.has_leases():
            # A run that was killed (kill -9, out of memory, a host that went down) leaves
            # its leases behind. Give back what a run would: leases of processes gone from
            # this host, and leases that have expired (of any host).
            now = time.time()
            src.reclaim(now)
            while src.maintain(now):
                pass
        if src.has_leases():
            raise WecomctlError(f"a run is working on {shown(source)} (items are leased by a process still "
                                "running, or on another host until their lease expires: run.lease_s); "
                                "stop it or wait, then copy")
        dst = open_location(target, create=True, **kw)
        start = time.time()
        loaded = dst.restore(src.snapshot(), time.time())
        problems = dst.check()
        before, after = totals(src.counts()), totals(dst.counts())
        src.close()
        dst.close()
    except WecomctlError as exc:
        _fail(exc)
    result = {"leads": loaded["leads"], "ledger": loaded["ledger"], "seconds": round(time.time() - start, 2),
              "check_problems": problems, "from": shown(source), "to": shown(target),
              "done": {st: after[st]["done"] for st in after}, "dead": {st: after[st]["dead"] for st in after}}
    same = all(before[st][k] == after[st][k] for st in before for k in ("done", "dead", "skipped", "entered"))
    if as_json:
        print(json.dumps({**result, "ok": same and not problems}, ensure_ascii=False))
    else:
        out.print(f"copied {loaded['leads']} leads and {loaded['ledger']} welcome-ledger entries from "
                  f"{result['from']} to {result['to']} in {result['seconds']}s; "
                  f"{'check ok' if not problems else f'{len(problems)} problems: ' + '; '.join(problems[:3])}",
                  highlight=False, markup=False)
        out.print(f"next: wecomctl run --config YOUR.yaml --store '{result['to']}'" if "://" in target
                  else f"next: wecomctl run --config YOUR.yaml -d {target}", highlight=False, markup=False)
    raise typer.Exit(EXIT_OK if same and not problems else EXIT_DEAD)


# --- simulate / demo ----------------------------------------------------------------------
@app.command()
def simulate(
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0 = pick a free one and print it; default 0)."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Added latency per call (default 0)."),
    rate_limit: Optional[int] = typer.Option(None, "--rate-limit", help="Calls per second per API (0 = none, the default); beyond it 45009 until the window ends."),
    rate_mode: Optional[str] = typer.Option(None, "--rate-mode", help="fixed (default): windows aligned to the clock (WeCom's block semantics); sliding: no window anywhere may exceed the limit."),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="Calls in flight per API (0 = none, the default); beyond it 45033."),
    busy_rate: Optional[float] = typer.Option(None, "--busy-rate", help="Share of calls answered -1 'system busy' (0..1, default 0)."),
    token_ttl: Optional[float] = typer.Option(None, "--token-ttl", help="Access token lifetime in seconds (then 42001; default 7200)."),
    staff: Optional[str] = typer.Option(None, "--staff", help="Comma-separated staff userids it knows (others get 60111)."),
    unknown_suffix: Optional[str] = typer.Option(None, "--unknown-suffix", help="Mobiles ending in these digits are unknown to the gateway (910001). Default 44."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the fault dice."),
    sim_config: Optional[str] = typer.Option(None, "--sim-config", help="YAML file with simulator knobs; flags given on the command line override it."),
    write_config: Optional[str] = typer.Option(None, "--write-config", help="Write a wecomctl config pointing at this simulator to FILE."),
):
    """Run a local WeCom-compatible server (with the add-by-phone gateway) for trying wecomctl.

    Example: wecomctl simulate --port 8080 --latency-ms 100 --rate-limit 50 --write-config sim.yaml
    then, in another terminal: wecomctl run --config sim.yaml
    """
    from wecomctl.simulator import SimConfig, serve

    try:
        sc = SimConfig.from_yaml(sim_config) if sim_config else SimConfig()
    except WecomctlError as exc:
        _fail(exc)
    given = {"port": port, "latency_ms": latency_ms, "rate_limit": rate_limit, "rate_mode": rate_mode,
             "max_concurrency": max_concurrency, "busy_rate": busy_rate, "token_ttl_s": token_ttl, "seed": seed}
    for knob, value in given.items():
        if value is not None:  # only what was given on the command line overrides the file
            setattr(sc, knob, value)
    if staff:
        sc.staff = tuple(x.strip() for x in staff.split(",") if x.strip())
    if unknown_suffix is not None:
        sc.unknown_suffix = unknown_suffix
    try:
        sc.validate()
    except ValueError as exc:
        _fail(WecomctlError(f"simulate: {exc}"))
    if write_config:
        try:
            open(write_config, "a", encoding="utf-8").close()
        except OSError as exc:
            _fail(WecomctlError(f"cannot write {write_config}: {exc.strerror or exc}"))

    def ready(url: str) -> None:
        print(f"simulator listening on {url}", flush=True)
        if write_config:
            with open(write_config, "w", encoding="utf-8") as fh:
                fh.write(cfg.simulator_config(url, sc))
            print(f"wrote {write_config}: try `wecomctl import samples/leads_demo.csv --campaign demo --config {write_config}` "
                  f"then `wecomctl run --config {write_config}`", flush=True)

    try:
        serve(sc, on_ready=ready)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK)
    except OSError as exc:
        _fail(WecomctlError(f"cannot listen on 127.0.0.1:{sc.port}: {exc.strerror or exc}"))


@app.command()
def demo(
    data_dir: Optional[str] = typer.Option(None, "--data-dir", "-d", help="Data directory (default: a new temporary one)."),
    workers: int = typer.Option(2, "--workers", "-w", help="Worker processes."),
    as_json: bool = JsonOpt,
):
    """Start the simulator with latency and faults, import the samples, run them to the end, report.

    Example: wecomctl demo
    """
    from wecomctl.demo import run_demo

    try:
        code = run_demo(out, err, data_dir, workers, as_json)
    except WecomctlError as exc:
        _fail(exc)
    raise typer.Exit(code)


def main() -> None:
    import sqlite3

    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except sqlite3.DatabaseError as exc:
        err.print(f"[red]error:[/] the store is damaged or not a wecomctl store ({escape(str(exc))}); "
                  "run `wecomctl check`, or use a new --data-dir", highlight=False)
        sys.exit(EXIT_USAGE)
    except RecursionError:
        err.print("[red]error:[/] the input is nested too deeply to be a lead file", highlight=False)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
