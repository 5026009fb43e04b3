"""`specfleet bench` as a user calls it: bad input gets one readable line and status 2, before anything runs."""

import pytest

import bench.harness
from actors.errors import InvalidRequest
from cluster.cli import main


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test instead of starting a benchmark if validation lets the input through."""
    def refuse(*args, **kwargs):
        pytest.fail("the benchmark started although its input is bad")

    monkeypatch.setattr(bench.harness, "plan_jobs", refuse)
    monkeypatch.setattr(bench.harness, "build_prompt_sets", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--systems", "specfleet,nope"], "systems.1: input should be"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--concurrency", "1,0"], "concurrency.1: input should be greater than or equal to 1"),
    (["--temperatures", "-1"], "temperatures.0: input should be greater than or equal to 0"),
    (["--quick", "--max-tokens", "1"], "max_tokens: input should be greater than or equal to 2"),
    (["--quick", "--max-tokens", "1000"], "exceed the target's context"),  # 48-token prompts + 1,000 + k + 1 > 1,024
])
def test_bad_options_end_with_one_line_and_status_2(argv, message, nothing_runs, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specfleet: error: bench: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_rendering_a_missing_report_is_refused(tmp_path, capsys):
    assert main(["bench", "--from-json", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_busy_machine_refuses_to_benchmark_unless_forced(monkeypatch):
    from bench import harness
    from bench.workloads import preset_config

    monkeypatch.setattr(harness, "load_average", lambda: [3.5, 2.0, 1.0])
    with pytest.raises(InvalidRequest, match="load average is 3.5"):
        harness.check_quiet(preset_config("quick"))
    harness.check_quiet(preset_config("quick", force=True))
    monkeypatch.setattr(harness, "load_average", lambda: [0.4, 0.5, 0.6])
    harness.check_quiet(preset_config("quick"))
