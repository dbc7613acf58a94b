"""The command line as a user meets it: ``main(argv)`` in this process, and one smoke test through
``python -m pipeline`` in a subprocess."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cli, run_cli


def test_python_m_pipeline_runs_and_refuses_in_one_line(tmp_path: Path) -> None:
    helped = run_cli("--help")
    assert helped.returncode == 0
    assert "build" in helped.stdout and "plan" in helped.stdout
    refused = run_cli("build", "parallel.tp=2", f"workdir={tmp_path}")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "parallel.tp=2" in refused.stderr


def test_commands_called_twice_in_one_process_keep_no_arguments(tmp_path: Path) -> None:
    """Command arguments are parameters, not module state: a second call starts clean."""
    first = cli("serve", f"workdir={tmp_path}", f"repo={tmp_path / 'elsewhere'}")
    second = cli("serve", f"workdir={tmp_path}")
    assert first.returncode == second.returncode == 1
    assert "is not a model repository" in first.stderr
    assert "no finished Triton repository for these overrides" in second.stderr  # no repo= left over


def test_missing_or_unknown_command_prints_usage_and_exits_2() -> None:
    missing = cli()
    assert missing.returncode == 2 and "usage:" in missing.stderr
    unknown = cli("deploy")
    assert unknown.returncode == 2
    assert "unknown command 'deploy'" in unknown.stderr and "usage:" in unknown.stderr


def test_build_help_shows_groups_and_keys() -> None:
    result = cli("build", "--help")
    assert result.returncode == 0
    assert "model=hf|llama70b|llama8b|local|smollm2-135m" in result.stdout
    assert "parallel:" in result.stdout and "workdir:" in result.stdout


def test_bad_option_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = cli("build", "model=nope", f"workdir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: unknown model 'nope': valid choices are model=hf|llama70b|llama8b|local|smollm2-135m"
    )
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("build", "model=nope", f"workdir={tmp_path}", env={"PIPELINE_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_plan_shows_stages_fingerprints_and_config_and_runs_nothing(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", "parallel.tp=3")
    assert result.returncode == 0, result.stderr
    assert "# resolved config" in result.stdout and "tp: 3" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("fetch ")]
    assert "will run" in row and str(tmp_path / "fetch") in row
    assert not (tmp_path / "fetch").exists()


def test_dry_run_prints_the_plan_and_stops(tmp_path: Path) -> None:
    result = cli("build", "dry_run=true", f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "will run" in result.stdout and "dry run: nothing was run" in result.stdout
    assert not (tmp_path / "fetch").exists()


def test_multirun_runs_one_job_per_combination(tmp_path: Path) -> None:
    result = cli("plan", "-m", "parallel.tp=1,3", "parallel.pp=1,2", f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("job ") == 4
    assert result.stdout.count("# resolved config") == 4


def test_multirun_refuses_a_bad_combination_before_any_job(tmp_path: Path) -> None:
    result = cli("build", "-m", "parallel.tp=1,2", f"workdir={tmp_path}")
    assert result.returncode == 1
    assert "parallel.tp=2" in result.stderr and "job 1/2" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_slurm_sweep_dry_run_prints_the_batch_script_it_would_submit(tmp_path: Path) -> None:
    """The SLURM launcher's batch script, written by submitit from the launcher's settings, without
    a cluster: this project's preset (hydra/launcher=slurm) and the plugin's own with a gres."""
    common = ["build", "-m", "quant=none,fp8", "model=llama8b", "target=h100", f"workdir={tmp_path}", "dry_run=true"]
    result = cli(*common, "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --time=360", "#SBATCH --array=0-1%"):
        assert line in script, script
    assert "#SBATCH --job-name=pipeline-build" in script and "-m submitit.core._submit" in script
    assert "quant=none model=llama8b" in script and "quant=fp8 model=llama8b" in script
    secret = cli(*common, "hydra/launcher=slurm", "tracking.uri=https://bob:pa55word@mlflow.example")
    assert secret.returncode == 0 and "pa55word" not in secret.stdout + secret.stderr  # the dry run is redacted
    plugin = cli(*common, "hydra/launcher=submitit_slurm", "hydra.launcher.gres=gpu:8", "hydra.launcher.timeout_min=30")
    assert plugin.returncode == 0, plugin.stderr
    assert "#SBATCH --gres=gpu:8" in plugin.stdout and "#SBATCH --time=30" in plugin.stdout
    assert not (tmp_path / "sweeps").exists()  # nothing was submitted


def test_cluster_commands_refuse_what_they_cannot_do_in_one_line(tmp_path: Path) -> None:
    launcher = cli("build", "-m", "quant=none,fp8", "hydra/launcher=slurmm", f"workdir={tmp_path}")
    assert launcher.returncode == 1 and "hydra/launcher=slurmm is not a launcher here: use one of" in launcher.stderr
    assert "submitit_slurm" in launcher.stderr and "ray_aws" not in launcher.stderr
    pull = cli("pull", f"workdir={tmp_path}")
    assert pull.returncode == 1 and "pull needs model_uri=models:/<name>@<alias>" in pull.stderr
    uri = cli("serve", "model_uri=runs:/abc/triton_repository", f"workdir={tmp_path}")
    assert uri.returncode == 1 and "give models:/<name>@<alias>" in uri.stderr
    untracked = cli("promote", "version=1", "tracking=none", f"workdir={tmp_path}")
    assert untracked.returncode == 1 and "drop tracking=none" in untracked.stderr
    assert all(len(r.stderr.strip().splitlines()) == 1 for r in (launcher, pull, uri, untracked))
