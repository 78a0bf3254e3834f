"""The maml-fast command line: presets, flag parsing and errors, train -> resume -> eval end to end,
missing data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maml_fast import backends, cli
from maml_fast.presets import PRESETS, ExperimentConfig, build_learner, build_source, get_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one CPU thread (conftest's `one_thread`)."""


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(list(argv)))


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


def test_presets_hold_the_papers_hyperparameters():
    assert set(PRESETS) >= {"sinusoid", "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                            "miniimagenet-5w1s", "miniimagenet-5w5s"}
    o5 = parse("train", "--preset", "omniglot-5w1s")
    assert (o5.ways, o5.shots, o5.inner_lr, o5.inner_steps, o5.meta_batch_size, o5.eval_inner_steps, o5.hidden,
            o5.max_pool, o5.meta_lr) == (5, 1, 0.4, 1, 32, 3, 64, False, 1e-3)
    o20 = parse("train", "--preset", "omniglot-20w1s")
    assert (o20.ways, o20.inner_lr, o20.inner_steps, o20.meta_batch_size) == (20, 0.1, 5, 16)
    mi = parse("train", "--preset", "miniimagenet-5w1s")
    assert (mi.inner_lr, mi.inner_steps, mi.eval_inner_steps, mi.meta_batch_size, mi.queries, mi.hidden, mi.max_pool,
            mi.clip_value, mi.iterations) == (0.01, 5, 10, 4, 15, 32, True, 10.0, 60_000)
    sine = parse("train", "--preset", "sinusoid")
    assert (sine.shots, sine.inner_lr, sine.meta_batch_size, sine.inner_steps, sine.iterations, sine.hidden,
            sine.norm) == (10, 0.01, 25, 1, 70_000, 40, "none")
    # every preset builds its learner (the network shapes fit the data)
    for name, config in PRESETS.items():
        learner = build_learner(config.replace(hidden=4) if config.datasource != "sinusoid" else config)
        assert learner.inner_steps == config.inner_steps, name


def test_flags_override_the_preset_under_clear_names():
    config = parse("train", "--preset", "omniglot-5w1s", "--ways", "20", "--shots", "5", "--meta-batch-size", "16",
                   "--inner-steps", "5", "--inner-lr", "0.1", "--meta-lr", "0.002", "--norm", "layer_norm",
                   "--hidden", "32", "--max-pool", "--first-order", "--pretrain-iterations", "7", "--iterations", "9",
                   "--eval-inner-steps", "10", "--no-test-set", "--clip-value", "10", "--no-conv", "--seed", "3")
    assert (config.ways, config.shots, config.meta_batch_size, config.inner_steps, config.inner_lr, config.meta_lr,
            config.norm, config.hidden, config.max_pool, config.first_order, config.pretrain_iterations,
            config.iterations, config.eval_inner_steps, config.eval_split, config.clip_value, config.conv,
            config.seed) == (20, 5, 16, 5, 0.1, 0.002, "layer", 32, True, True, 7, 9, 10, "val", 10.0, False, 3)
    assert parse("train", "--datasource", "omniglot").name == "omniglot-5w1s"  # the datasource's paper preset
    assert parse("train").name == "sinusoid"  # the reference code's default datasource
    assert parse("train", "--preset", "sinusoid", "--norm", "None").norm == "none"
    assert parse("train", "--preset", "miniimagenet-5w1s", "--clip-value", "none").clip_value is None


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--shots", "0"], "expected a positive integer"),
    (["train", "--inner-lr", "fast"], "expected a number"),
    (["train", "--norm", "group"], "expected batch, layer or none"),
    (["train", "--preset", "imagenet"], "invalid choice"),
    (["train", "--datasource", "mnist"], "invalid choice"),
    (["fly"], "invalid choice"),
    ([], "required"),
])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "omniglot-5w1s", "--datasource", "sinusoid"], "does not match --preset"),
    (["train", "--preset", "omniglot-5w1s", "--baseline", "oracle"], "only defined for datasource='sinusoid'"),
    (["train", "--preset", "sinusoid", "--iterations", "0"], "nothing to train"),
    (["train", "--preset", "sinusoid", "--backend", "warp", "--iterations", "1"], "--backend must be"),
    (["eval"], "needs --logdir"),
    (["eval", "--logdir", "/nonexistent/run"], "/nonexistent/run/checkpoint.pt does not exist"),
])
def test_bad_combinations_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_the_reference_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("datasource", "num_classes", "update_batch_size", "meta_batch_size", "num_updates", "update_lr",
                 "meta_lr", "norm", "num_filters", "max_pool", "stop_grad", "pretrain_iterations",
                 "metatrain_iterations", "test_num_updates", "--train", "resume", "logdir", "test_set", "test_iter",
                 "baseline", "train_update_batch_size", "train_update_lr", "--conv", "--log"):
        assert flag in text, flag


def test_missing_data_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--preset", "omniglot-5w1s", "--data-root", str(missing), "--logdir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "miniimagenet-5w1s", "--logdir", str(tmp_path / "r")])
    assert "--data-root" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "miniimagenet-5w1s", "--data-root", str(empty), "--logdir", str(tmp_path / "r")])
    assert str(empty / "train.csv") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "omniglot-5w1s", "--data-root", str(empty), "--logdir", str(tmp_path / "r")])
    assert str(empty) in capsys.readouterr().err


def test_train_resume_and_eval_end_to_end(tmp_path, capsys):
    logdir = tmp_path / "sine"
    common = ["--preset", "sinusoid", "--logdir", str(logdir), "--log-every", "5", "--checkpoint-every", "10",
              "--eval-episodes", "20", "--eval-inner-steps", "2", "--no-progress"]
    code, out = run_cli(capsys, "train", *common, "--iterations", "10")
    assert code == 0
    assert "trained 10 iterations" in out.out and "RESULT after 2 steps: loss" in out.out
    for name in ("checkpoint.pt", "metrics.jsonl", "eval.json", "learning_curve.png"):
        assert (logdir / name).is_file(), name
    assert list((logdir / "tensorboard").glob("events.*"))
    result = json.loads((logdir / "eval.json").read_text())
    assert result["num_episodes"] == 20 and len(result["loss_mean"]) == 3
    assert result["info"]["config"]["name"] == "sinusoid"

    # same command with more iterations: resumes at 10 (the reference's resume=True default)
    code, out = run_cli(capsys, "train", *common, "--iterations", "15")
    assert code == 0 and "resumed at iteration 10" in out.out and "trained 15 iterations (5 now" in out.out
    # a different network in the same logdir is refused
    with pytest.raises(SystemExit):
        cli.main(["train", *common, "--iterations", "20", "--hidden", "8"])
    assert "different experiment" in capsys.readouterr().err

    code, out = run_cli(capsys, "eval", "--logdir", str(logdir), "--eval-episodes", "20", "--eval-inner-steps", "2")
    assert code == 0 and "iteration 15" in out.out
    evaluated = json.loads((logdir / "eval_checkpoint_test.json").read_text())
    assert evaluated["info"]["iterations"] == 15 and len(evaluated["loss_mean"]) == 3


def test_train_tiny_omniglot_on_the_bundled_data(tmp_path, capsys):
    code, out = run_cli(capsys, "train", "--preset", "omniglot-5w1s", "--iterations", "2", "--hidden", "8",
                        "--meta-batch-size", "2", "--eval-episodes", "10", "--time-limit", "5",
                        "--logdir", str(tmp_path / "o"), "--no-progress", "--val-every", "2", "--val-episodes", "4")
    assert code == 0
    assert "RESULT after 3 steps: accuracy" in out.out
    # the banner says which backend "auto" chose
    chosen = backends.resolve_backend("auto", torch.device("cpu")).name
    assert f"backend auto ({chosen})" in out.out
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "val" for r in records)


def test_bench_and_presets_commands(capsys):
    code, out = run_cli(capsys, "bench", "--preset", "sinusoid", "--backends", "loop", "torch", "--steps", "1",
                        "--warmup", "0")
    assert code == 0 and "| loop |" in out.out and "| torch |" in out.out
    code, out = run_cli(capsys, "presets")
    assert code == 0 and "omniglot-20w1s" in out.out


def test_oracle_baseline_recovers_amplitude_and_phase():
    config = get_preset("sinusoid").replace(baseline="oracle", meta_batch_size=6)
    source = build_source(config, "train")
    batch = source.sample()
    assert batch.support_x.shape == (6, 10, 3)
    x, amplitude, phase = batch.query_x[..., 0], batch.query_x[..., 1], batch.query_x[..., 2]
    torch.testing.assert_close(amplitude * torch.sin(x - phase), batch.query_y[..., 0], rtol=1e-4, atol=1e-4)
    from maml_fast.presets import effective_config
    assert (effective_config(config).iterations, effective_config(config).pretrain_iterations) == (0, 70_000)


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "maml_fast", "--help"], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0 and "update_batch_size" in result.stdout


def test_config_validation():
    with pytest.raises(ValueError, match="norm"):
        ExperimentConfig(norm="group")
    with pytest.raises(ValueError, match="unknown config fields"):
        get_preset("sinusoid").replace(colour="red")
    assert ExperimentConfig.from_dict({**get_preset("omniglot-5w1s").to_dict(), "extra": 1}).ways == 5


def test_cuda_graph_flag(tmp_path, capsys):
    """--cuda-graph (train and eval): 'on' is refused on the CPU with a message naming the flag; 'auto'
    trains and evaluates eagerly and the banner says why."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--preset", "sinusoid", "--iterations", "1", "--no-progress", "--no-eval",
                  "--logdir", str(tmp_path / "on"), "--cuda-graph", "on"])
    assert exit_info.value.code != 0 and "--cuda-graph on" in capsys.readouterr().err
    code, out = run_cli(capsys, "train", "--preset", "sinusoid", "--iterations", "1", "--no-progress", "--no-eval",
                        "--logdir", str(tmp_path / "auto"))
    assert code in (0, None) and "meta-step: eager (--cuda-graph auto" in out.out + out.err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--logdir", str(tmp_path / "auto"), "--eval-episodes", "4", "--cuda-graph", "on"])
    assert exit_info.value.code != 0 and "--cuda-graph on" in capsys.readouterr().err
    code, out = run_cli(capsys, "eval", "--logdir", str(tmp_path / "auto"), "--eval-episodes", "4")
    assert code in (0, None) and "adapt + predict: eager (--cuda-graph auto" in out.out
