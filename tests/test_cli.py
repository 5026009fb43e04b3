"""`specfleet generate` end to end on tiny checkpoints, and its errors."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_speculative_and_plain_runs_print_the_same_greedy_text(capsys, target_path, drafter_path):
    code, spec_out, spec_err = run_cli(capsys, "--target", target_path, "--drafter", f"{drafter_path}:2", "--k", 3, "def f(x):")
    assert code == 0
    assert "mean_accepted_length=" in spec_err and "target_forwards=" in spec_err and "tokens_per_s=" in spec_err
    assert "exit=2 k=3" in spec_err
    code, plain_out, plain_err = run_cli(capsys, "--target", target_path, "--no-spec", "def f(x):")
    assert code == 0 and plain_out == spec_out and spec_out.strip()
    assert "mean_accepted_length=1.0 " in plain_err and "drafter=none" in plain_err


def test_json_output_carries_tokens_and_stats(capsys, target_path, drafter_path):
    code, out, _ = run_cli(capsys, "--target", target_path, "--drafter", drafter_path, "--max-tokens", 9, "--json", "x = 1")
    report = json.loads(out)
    assert code == 0 and report["tokens"] == 9 and report["finish_reason"] == "length"
    assert report["exit"] == 4  # the drafter's deepest exit by default
    assert report["target_forwards"] * report["mean_accepted_length"] >= 9


def test_sampled_run_is_reproducible_with_a_seed(capsys, target_path, drafter_path):
    args = ["--target", target_path, "--drafter", drafter_path, "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "--json", "import"]
    first = json.loads(run_cli(capsys, *args)[1])
    second = json.loads(run_cli(capsys, *args)[1])
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) == first["tokens"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "0"], "draft length k must be in 1..64"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-tokens", "1000"], "exceeds the target's context"),
    ],
)
def test_bad_options_fail_with_a_message(capsys, target_path, drafter_path, extra, message):
    code, out, err = run_cli(capsys, "--target", target_path, "--drafter", drafter_path, *extra, "hello")
    assert code == 2 and out == ""
    assert err.startswith("specfleet: error:") and message in err


def test_empty_prompt_unknown_path_and_a_drafter_of_another_vocabulary(capsys, target_path, other_vocab_path, tmp_path):
    assert run_cli(capsys, "--target", target_path, "--no-spec", "")[2].endswith("prompt is empty: give some text to complete\n")
    assert "is not a directory" in run_cli(capsys, "--target", tmp_path / "missing", "hi")[2]
    assert "no config.json" in run_cli(capsys, "--target", tmp_path, "hi")[2]
    code, out, _ = run_cli(capsys, "--target", target_path, "--drafter", other_vocab_path, "--max-tokens", "8", "hi")
    assert code == 0 and out  # a drafter of another vocabulary drafts across it


def test_errors_never_show_a_traceback(target_path):
    """The installed command, in its own process: one line on stderr, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--target", str(target_path), "--drafter", f"{target_path}:9", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == f"specfleet: error: exit 9 is outside 1..4 layers of {target_path}"


def test_the_grpc_client_commands_start_without_torch_ray_or_transformers():
    """`specfleet generate --server` and `specfleet status` are thin gRPC clients: they must start fast."""
    probe = ("import sys; from cluster.cli import build_parser; "
             "build_parser().parse_args(['generate', '--server', '127.0.0.1:1', 'hi']); "
             "build_parser().parse_args(['status']); "
             "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
