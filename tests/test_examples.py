"""The seed README's example runs as written, and the CLI does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from substantial.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_seed_readme_example_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "examples.readme_worker"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "Final output 100.0"
    assert len(lines) == 3 and all(len(x) == 32 for x in lines[:2])  # the two event ids
    assert (tmp_path / ".substantial" / "logs" / "readme").is_dir()


def test_demo_command_narrates_the_readme_scenario(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/demo.db"
    result = CliRunner().invoke(main, ["demo", "--backend", url, "--sleep", "0.3"])
    assert result.exit_code == 0, result.output
    assert "final output: 100.0" in result.output
    assert "run status: completed" in result.output
    run_id = result.output.split("started run ")[1].split(";")[0]

    shown = CliRunner().invoke(main, ["runs", "show", run_id, "--backend", url])
    assert shown.exit_code == 0, shown.output
    assert f"run {run_id}  workflow readme-example  completed" in shown.output
    shown = CliRunner().invoke(main, ["runs", "show", run_id, "--raw", "--backend", url])
    for kind in ("start", "step", "sleep", "timer", "event", "end"):
        assert f"  {kind} " in shown.output

    listed = CliRunner().invoke(main, ["runs", "list", "--backend", url])
    assert run_id in listed.output and "completed" in listed.output


def test_runs_send_and_cancel_commands(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/cli.db"
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url}
    start = subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncio\nfrom tests.workflows import conductor, collect\n"
            "async def go():\n"
            "    await conductor.start(collect, {'count': 2}, run_id='cli-run')\n"
            "    await conductor.close()\n"
            "asyncio.run(go())",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert start.returncode == 0, start.stderr
    sent = CliRunner().invoke(
        main, ["runs", "send", "cli-run", "item", '{"a": 1}', "--backend", url]
    )
    assert sent.exit_code == 0, sent.output
    bad = CliRunner().invoke(main, ["runs", "send", "cli-run", "item", "{oops", "--backend", url])
    assert bad.exit_code != 0 and "VALUE must be JSON" in bad.output
    cancelled = CliRunner().invoke(main, ["runs", "cancel", "cli-run", "--backend", url])
    assert cancelled.exit_code == 0 and "cancel requested" in cancelled.output
    shown = CliRunner().invoke(main, ["runs", "show", "cli-run", "--backend", url])
    assert "2 event(s) waiting in the inbox" in shown.output
    missing = CliRunner().invoke(main, ["runs", "show", "nope", "--backend", url])
    assert missing.exit_code != 0 and "no run 'nope'" in missing.output


def test_worker_command_rejects_a_bad_target() -> None:
    result = CliRunner().invoke(main, ["worker", "no_colon"])
    assert result.exit_code != 0 and "MODULE:ATTRIBUTE" in result.output
    result = CliRunner().invoke(main, ["worker", "tests.workflows:trace"])
    assert result.exit_code != 0 and "is not a Conductor" in result.output
