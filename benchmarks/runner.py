"""Runs every scenario through every transport in one lab, interleaved, and writes the results.

Order: for each repeat, transports in a rotated order (so no transport always runs first or last); each
transport is started, runs all its applicable scenarios, and is stopped before the next starts (they
would otherwise fight over the client's routes). Noise that drifts over the run thus hits all alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.env import build_env
from benchmarks.lab import Lab, cleanup_stale
from benchmarks.machine import machine_info
from benchmarks.report import ratio_rows, render, summaries_for_json, summarize, write_chart, write_json
from benchmarks.scenarios import Scenario, ScenarioError, Settings
from benchmarks.transports import ALL_TRANSPORTS, Transport, TransportUnavailable

log = logging.getLogger(__name__)

SUBJECTS = ("x2ssh", "x2ssh-D")  # the first of these that ran is rated against the others


class BenchmarkRun:
    """One harness run; `execute()` builds the lab, measures, tears down; `finish()` writes and prints."""

    def __init__(
        self,
        scenarios: list[Scenario],
        transport_names: list[str],
        settings: Settings,
        out_dir: Path,
        console: Console,
        command: list[str],
        server_cpus: set[int] | None = None,
    ) -> None:
        """`server_cpus`: the server and target side runs there (see `build_env`)."""
        self.scenarios = scenarios
        self.server_cpus = server_cpus
        self.transports: list[Transport] = [ALL_TRANSPORTS[name]() for name in transport_names]
        self.settings = settings
        self.console = console
        self.started = datetime.now(UTC)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        self.out_dir = out_dir
        self.json_path = out_dir / f"bench-{stamp}.json"
        self.png_path = out_dir / f"bench-{stamp}.png"
        self.log_dir = out_dir / f"logs-{stamp}"
        self.command = command
        self.samples: list[dict[str, Any]] = []
        self.status: dict[str, dict[str, str]] = {t.name: {"status": "ok"} for t in self.transports}
        self.interrupted = False
        self.netem_backend = "not used"

    def _applicable(self, transport: Transport) -> list[Scenario]:
        return [s for s in self.scenarios if transport.supports(s.requires)]

    def execute(self) -> None:
        cleanup_stale()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        total = self.settings.repeats * sum(len(self._applicable(t)) for t in self.transports)
        with Lab() as lab, self._progress() as progress:
            task = progress.add_task("building lab", total=total)
            env = build_env(lab, self.log_dir, self.settings.download_size, self.server_cpus)
            for repeat in range(self.settings.repeats):
                shift = repeat % len(self.transports)
                for transport in self.transports[shift:] + self.transports[:shift]:
                    scenarios = self._applicable(transport)
                    if self.status[transport.name]["status"] != "ok":
                        progress.advance(task, len(scenarios))
                        continue
                    progress.update(task, description=f"repeat {repeat + 1}: starting {transport.name}")
                    try:
                        transport.start(env)
                    except TransportUnavailable as exc:
                        self.status[transport.name] = {"status": "unavailable", "reason": str(exc)}
                        log.warning("%s unavailable: %s", transport.name, exc)
                        progress.advance(task, len(scenarios))
                        continue
                    try:
                        for scenario in scenarios:
                            desc = f"repeat {repeat + 1}: {scenario.name} via {transport.name}"
                            progress.update(task, description=desc)
                            self._measure(env, transport, scenario, repeat)
                            progress.advance(task)
                    finally:
                        transport.stop()
                        if lab.netem_backend != "none":
                            self.netem_backend = lab.netem_backend

    def _measure(self, env: Any, transport: Transport, scenario: Scenario, repeat: int) -> None:
        metrics = scenario.metrics(self.settings)
        began = time.monotonic()
        try:
            values = scenario.run(env, transport, self.settings)
            error = None
        except (ScenarioError, TransportUnavailable, OSError, KeyError, ValueError) as exc:
            values, error = {}, f"{type(exc).__name__}: {exc}"
            log.warning("%s via %s failed: %s", scenario.name, transport.name, error)
        except Exception as exc:  # a harness bug must not lose the other measurements
            values, error = {}, f"{type(exc).__name__}: {exc}"
            log.exception("%s via %s crashed", scenario.name, transport.name)
        seconds = time.monotonic() - began
        for metric in metrics:
            value, extra = values.get(metric.key, (None, {}))
            self.samples.append(
                {
                    "scenario": scenario.name,
                    "metric": metric.key,
                    "transport": transport.name,
                    "repeat": repeat,
                    "value": value,
                    "unit": metric.unit,
                    "extra": extra,
                    "error": error,
                    "scenario_seconds": round(seconds, 3),
                }
            )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )

    def document(self) -> dict[str, Any]:
        metrics = [
            {**asdict(m), "scenario": s.name} for s in self.scenarios for m in s.metrics(self.settings)
        ]
        summaries = summarize(self.samples)
        ran = [
            t.name
            for t in self.transports
            if self.status[t.name]["status"] == "ok" and any(s["transport"] == t.name for s in self.samples)
        ]
        subject = next((n for n in SUBJECTS if n in ran), next((n for n in ran if n != "direct"), None))
        ratios = ratio_rows(metrics, summaries, subject, [n for n in ran if n != subject]) if subject else []
        return {
            "command": self.command,
            "started": self.started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "interrupted": self.interrupted,
            "machine": {**machine_info(), "server_cpus_used": sorted(self.server_cpus or []) or None},
            "netem_backend": self.netem_backend,
            "settings": asdict(self.settings),
            "scenarios": [{"name": s.name, "description": s.description} for s in self.scenarios],
            "transports": [
                {"name": t.name, "description": t.description, **self.status[t.name]} for t in self.transports
            ],
            "metrics": metrics,
            "samples": self.samples,
            "summary": summaries_for_json(summaries),
            "ratios": ratios,
        }

    def finish(self) -> dict[str, Any]:
        doc = self.document()
        chart_skipped = write_chart(self.png_path, doc)
        doc["chart"] = None if chart_skipped else str(self.png_path)
        doc["chart_skipped"] = chart_skipped
        write_json(self.json_path, doc)
        render(self.console, doc)
        self.console.print(f"results: {self.json_path}")
        if chart_skipped:
            self.console.print(f"[yellow]chart skipped: {escape(chart_skipped)}[/yellow]")
        else:
            self.console.print(f"chart: {self.png_path}")
        self.console.print(f"transport logs: {self.log_dir}")
        return doc
