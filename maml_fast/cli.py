"""``maml-fast``: train, evaluate and time MAML on the paper's experiments.

    maml-fast train --preset omniglot-5w1s --time-limit 8          # train, then evaluate on held-out tasks
    maml-fast eval --logdir runs/omniglot-5w1s --eval-episodes 600   # the paper's protocol on a checkpoint
    maml-fast bench --preset omniglot-5w1s --backends loop vmap torch
    maml-fast presets                                                # list the presets
    torchrun --nproc-per-node 4 -m maml_fast train --preset miniimagenet-5w1s --meta-batch-size 16

Also ``python -m maml_fast ...``. Run ``maml-fast train --help`` for every option and the table of
cbfinn/maml flags.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from .presets import DATASOURCES, NETWORKS, PRESETS, ExperimentConfig, effective_config, get_preset

FLAG_TABLE = """\
cbfinn/maml main.py flag        maml-fast equivalent
------------------------------  ------------------------------------------------------------
--datasource                    --datasource {sinusoid,omniglot,miniimagenet} (or --preset)
--num_classes                   --ways
--baseline=oracle               --baseline oracle (sinusoid; pretrained only, as the reference)
--pretrain_iterations           --pretrain-iterations
--metatrain_iterations          --iterations
--meta_batch_size               --meta-batch-size
--meta_lr                       --meta-lr
--update_batch_size             --shots (training) / --eval-shots (testing, default --shots)
--update_lr                     --inner-lr (training) / --eval-inner-lr (testing, default --inner-lr)
--num_updates                   --inner-steps
--norm batch_norm|layer_norm|None  --norm batch|layer|none
--num_filters                   --hidden
--conv                          --conv / --no-conv (Omniglot: the 256-128-64-64 fully connected net)
--max_pool                      --max-pool / --no-max-pool
--stop_grad                     --first-order
--log                           --log / --no-log
--logdir                        --logdir
--resume                        --resume / --no-resume (default: resume, as the reference)
--train=True / --train=False    maml-fast train / maml-fast eval
--test_iter                     maml-fast eval --test-iter N (needs train --keep-checkpoints)
--test_set                      --test-set / --no-test-set (= --eval-split test / val)
--train_update_batch_size       --shots (the training value; eval with --eval-shots)
--train_update_lr               --inner-lr (the training value; eval with --eval-inner-lr)
test_num_updates (hard-coded)   --eval-inner-steps
"""

# CLI option -> ExperimentConfig field (options given on the command line override the preset).
_CONFIG_OPTIONS = {
    "datasource": "datasource", "data_root": "data_root", "ways": "ways", "shots": "shots", "queries": "queries",
    "meta_batch_size": "meta_batch_size", "inner_steps": "inner_steps", "inner_lr": "inner_lr",
    "inner_loss": "inner_loss", "meta_lr": "meta_lr", "iterations": "iterations",
    "pretrain_iterations": "pretrain_iterations", "cosine": "cosine", "min_lr_ratio": "min_lr_ratio",
    "clip_value": "clip_value", "clip_norm": "clip_norm", "norm": "norm", "hidden": "hidden", "conv": "conv",
    "network": "network",
    "max_pool": "max_pool", "first_order": "first_order", "adapt_bn": "adapt_bn_affine", "baseline": "baseline",
    "step_metrics": "step_metrics",
    "pixels": "pixels", "eval_inner_steps": "eval_inner_steps", "eval_split": "eval_split",
    "eval_episodes": "eval_episodes", "eval_shots": "eval_shots", "eval_queries": "eval_queries",
    "eval_inner_lr": "eval_inner_lr", "eval_batch_size": "eval_batch_size", "backend": "backend", "dtype": "dtype",
    "seed": "seed", "log_every": "log_every", "checkpoint_every": "checkpoint_every",
}
_EVAL_OPTIONS = ("eval_inner_steps", "eval_split", "eval_episodes", "eval_shots", "eval_queries", "eval_inner_lr",
                 "eval_batch_size", "backend", "data_root")
# Fields that change the network or the meaning of the checkpoint: a resumed run must match them.
_STRUCTURAL = ("datasource", "network", "ways", "hidden", "conv", "max_pool", "norm", "baseline", "dtype", "inner_steps",
               "shots", "queries", "meta_batch_size")
_DEFAULT_PRESET = {"sinusoid": "sinusoid", "omniglot": "omniglot-5w1s", "miniimagenet": "miniimagenet-5w1s"}
_NORM_ALIASES = {"batch": "batch", "batch_norm": "batch", "layer": "layer", "layer_norm": "layer", "none": "none",
                 "None": "none"}


class CLIError(Exception):
    """A user error reported as ``maml-fast: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------ arguments
def _int_at_least(minimum: int, description: str):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {description}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive integer")
_count = _int_at_least(0, "non-negative integer")


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text!r}")
    return value


def _positive_float(text):
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _clip(text):
    """A positive number, or 0 / none to switch clipping off."""
    if text.lower() in ("none", "off", "0"):
        return None
    return _positive_float(text)


def _norm(text):
    if text not in _NORM_ALIASES:
        raise argparse.ArgumentTypeError(f"expected batch, layer or none (or the reference's batch_norm, layer_norm, "
                                         f"None), got {text!r}")
    return _NORM_ALIASES[text]


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    group = parser.add_argument_group("experiment (override the preset; reference flag in brackets)")
    group.add_argument("--preset", choices=list(PRESETS), default=S,
                       help="start from this experiment (default: the paper preset of --datasource, else sinusoid)")
    group.add_argument("--datasource", choices=DATASOURCES, default=S, help="[datasource]")
    group.add_argument("--data-root", default=S, metavar="PATH",
                       help="dataset folder (Omniglot: default the copy bundled with maml_fast; MiniImageNet: "
                            "required, the Ravi & Larochelle layout)")
    group.add_argument("--ways", type=_positive_int, default=S, help="classes per task [num_classes]")
    group.add_argument("--shots", type=_positive_int, default=S,
                       help="support examples per class (sinusoid: points) [update_batch_size, train_update_batch_size]")
    group.add_argument("--queries", type=_positive_int, default=S,
                       help="query examples per class (sinusoid: points); reference: = shots, MiniImageNet 15")
    group.add_argument("--meta-batch-size", type=_positive_int, default=S, help="tasks per meta-step [meta_batch_size]")
    group.add_argument("--inner-steps", type=_count, default=S, help="inner steps in training [num_updates]")
    group.add_argument("--inner-lr", type=_nonneg_float, default=S, help="inner step size α [update_lr, train_update_lr]")
    group.add_argument("--inner-loss", choices=("reference", "mean"), default=S,
                       help="inner gradient of sum(CE)/K as the reference code (= N x mean) or of the mean CE")
    group.add_argument("--meta-lr", type=_positive_float, default=S, help="Adam learning rate [meta_lr]")
    group.add_argument("--iterations", type=_count, default=S, help="meta-training iterations [metatrain_iterations]")
    group.add_argument("--pretrain-iterations", type=_count, default=S,
                       help="iterations on the pre-update loss first [pretrain_iterations]")
    group.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=S,
                       help="cosine decay of the meta lr over all iterations")
    group.add_argument("--min-lr-ratio", type=_nonneg_float, default=S, help="final meta lr / meta lr with --cosine")
    group.add_argument("--clip-value", type=_clip, default=S, metavar="X|none",
                       help="clip the meta-gradient elementwise to ±X (MiniImageNet presets: 10)")
    group.add_argument("--clip-norm", type=_clip, default=S, metavar="X|none", help="clip the meta-gradient's norm to X")
    group.add_argument("--norm", type=_norm, default=S, metavar="{batch,layer,none}", help="[norm]")
    group.add_argument("--hidden", type=_positive_int, default=S,
                       help="conv filters (sinusoid: hidden units) [num_filters]")
    group.add_argument("--conv", action=argparse.BooleanOptionalAction, default=S, help="[conv]")
    group.add_argument("--network", choices=NETWORKS, default=S,
                       help="image network: conv4 (the paper's), resnet12 (64-160-320-640) or wrn28_10 (Wide ResNet)")
    group.add_argument("--max-pool", action=argparse.BooleanOptionalAction, default=S, help="[max_pool]")
    group.add_argument("--first-order", action=argparse.BooleanOptionalAction, default=S,
                       help="first-order MAML: no second derivatives [stop_grad]")
    group.add_argument("--adapt-bn", action=argparse.BooleanOptionalAction, default=S,
                       help="adapt the norm layers' affine parameters in the inner loop (reference: no)")
    group.add_argument("--step-metrics", action=argparse.BooleanOptionalAction, default=S,
                       help="log the query metrics before and between the inner steps too (costs a forward each; "
                            "without it the pre-update numbers are the support set's)")
    group.add_argument("--baseline", choices=("oracle",), default=S, help="[baseline] sinusoid oracle")
    group.add_argument("--pixels", choices=("grayscale", "binary"), default=S,
                       help="Omniglot pixels: anti-aliased grayscale, or binary as the reference's resize")
    group.add_argument("--dtype", choices=("float32", "float64"), default=S)
    group.add_argument("--seed", type=int, default=S, help="initialisation and task stream seed")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    group = parser.add_argument_group("evaluation (the paper's protocol: fixed held-out episodes, mean ± 95% CI)")
    group.add_argument("--eval-episodes", type=_positive_int, default=S, help="held-out episodes (default 600)")
    group.add_argument("--eval-inner-steps", type=_count, default=S,
                       help="inner steps at test time; every count 0..N is reported [test_num_updates]")
    group.add_argument("--eval-split", choices=("test", "val"), default=S, help="held-out split [test_set]")
    group.add_argument("--test-set", dest="test_set", action=argparse.BooleanOptionalAction, default=S,
                       help="[test_set]: --test-set = --eval-split test, --no-test-set = --eval-split val")
    group.add_argument("--eval-shots", type=_positive_int, default=S, help="support examples per class at test time")
    group.add_argument("--eval-queries", type=_positive_int, default=S, help="query examples per class at test time")
    group.add_argument("--eval-inner-lr", type=_nonneg_float, default=S, help="inner step size at test time")
    group.add_argument("--eval-batch-size", type=_positive_int, default=S, help="episodes per evaluation batch")
    group.add_argument("--eval-seed", type=int, default=0, help="seed of the fixed evaluation episodes")


def _add_cuda_graph_option(parser, what: str) -> None:  # (a parser or an argument group)
    parser.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                        help=f"run {what} as CUDA graphs: 'on' (CUDA only), 'off', or 'auto' (eager until the GPU "
                             "check has passed the graphed step for this torch version; the banner says which)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    group = parser.add_argument_group("device")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--backend", default=S, help="auto, loop, vmap, torch, or a registered fused backend")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads for torch (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maml-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MAML with the whole meta-batch as task-batched ops.\n\n" + FLAG_TABLE,
        epilog="presets: " + ", ".join(PRESETS) + ". train, eval and bench set OMP_WAIT_POLICY=PASSIVE (re-running "
               "themselves once) unless it is set: spinning OpenMP threads slow a shared CPU down many times.")
    commands = parser.add_subparsers(dest="command", metavar="{train,eval,bench,presets}")
    commands.required = True

    train = commands.add_parser("train", help="meta-train (then evaluate on held-out tasks)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Meta-train a preset (options override it), checkpointing to --logdir, "
                                            "then evaluate with the paper's protocol.\n\n" + FLAG_TABLE)
    _add_experiment_options(train)
    _add_eval_options(train)
    _add_device_options(train)
    run = train.add_argument_group("run")
    run.add_argument("--logdir", default=None, help="metrics, TensorBoard files and checkpoints (default runs/<preset>)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue from --logdir's checkpoint if there is one [resume]")
    run.add_argument("--time-limit", type=_positive_float, default=None, metavar="MINUTES",
                     help="stop training cleanly after this many minutes, then evaluate")
    run.add_argument("--log", action=argparse.BooleanOptionalAction, default=True,
                     help="write metrics.jsonl and TensorBoard files [log]")
    run.add_argument("--log-every", type=_positive_int, default=argparse.SUPPRESS, help="iterations per logged record")
    run.add_argument("--checkpoint-every", type=_positive_int, default=argparse.SUPPRESS,
                     help="iterations per checkpoint")
    run.add_argument("--keep-checkpoints", action="store_true", help="also keep checkpoint_<iteration>.pt files")
    run.add_argument("--max-bad-steps", type=_count, default=10,
                     help="consecutive NaN/inf steps tolerated (skipped) before training stops")
    run.add_argument("--val-every", type=_count, default=0, help="validate on held-out episodes every N iterations")
    run.add_argument("--val-episodes", type=_positive_int, default=100, help="episodes per validation")
    run.add_argument("--no-eval", dest="final_eval", action="store_false", help="skip the evaluation after training")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    _add_cuda_graph_option(run, "each meta-step and the evaluation's adapt + predict")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint with the paper's protocol (reference --train=False)")
    source = evaluate.add_argument_group("checkpoint")
    source.add_argument("--logdir", default=None, help="a train --logdir (its checkpoint.pt)")
    source.add_argument("--checkpoint", default=None, help="a checkpoint file")
    source.add_argument("--test-iter", type=_count, default=None,
                        help="the checkpoint_<N>.pt of --logdir (kept with --keep-checkpoints) [test_iter]")
    source.add_argument("--data-root", default=argparse.SUPPRESS, help="dataset folder (default: as in training)")
    source.add_argument("--out", default=None, help="write the results JSON here (default: next to the checkpoint)")
    _add_eval_options(evaluate)
    _add_device_options(evaluate)
    _add_cuda_graph_option(evaluate, "the evaluation's adapt + predict of each batch of episodes")

    bench = commands.add_parser("bench", help="time meta-steps of a preset on each backend")
    _add_experiment_options(bench)
    _add_device_options(bench)
    bench.add_argument("--backends", nargs="+", default=["loop", "vmap", "torch"], help="backends to time")
    bench.add_argument("--steps", type=_positive_int, default=5, help="timed meta-steps per backend")
    bench.add_argument("--warmup", type=_count, default=2, help="untimed meta-steps first")

    commands.add_parser("presets", help="list the presets and their settings")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset (or the default one) with the command line's options applied."""
    given = vars(args)
    if "preset" in given:
        config = get_preset(given["preset"])
    else:
        config = get_preset(_DEFAULT_PRESET[given.get("datasource", "sinusoid")])
    changes = {field: given[option] for option, field in _CONFIG_OPTIONS.items() if option in given}
    if "test_set" in given:
        changes["eval_split"] = "test" if given["test_set"] else "val"
    if "datasource" in given and given["datasource"] != config.datasource:
        raise CLIError(f"--datasource {given['datasource']} does not match --preset {config.name} "
                       f"({config.datasource}); leave one out")
    try:
        return config.replace(**changes)
    except ValueError as error:
        raise CLIError(str(error)) from None


# ------------------------------------------------------------------------------------ commands
def _setup_torch(args):
    import torch
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return torch


def _resolve_device(torch, name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _backend_label(name: str, device) -> str:
    """The backend as configured, with what "auto" chose on `device`, e.g. "auto (cuda)"."""
    from . import backends
    return f"{name} ({backends.resolve_backend(name, device).name})" if name == "auto" else name


def _check_backend(config):
    from . import backends
    if config.backend != "auto" and config.backend not in backends.backend_names():
        raise CLIError(f"--backend must be auto or one of {', '.join(backends.backend_names())}, got {config.backend!r}")


def _print(*parts):
    print(*parts, flush=True)


def _evaluate_and_report(learner, config, device, logdir: Path | None, args, extra: dict, out: Path | None = None,
                         graphs=None):
    """`graphs`: a `GraphedEvaluation` of `learner` when the run is graphed (else eager)."""
    from .evaluation import evaluate, plot_learning_curve
    from .presets import build_source
    source = build_source(config, config.eval_split, device)
    start = time.monotonic()
    result = evaluate(learner, source, config.eval_episodes, steps=config.eval_inner_steps, seed=args.eval_seed,
                      batch_size=config.eval_batch_size, inner_lr=config.eval_inner_lr, graphs=graphs)
    result.info.update(split=config.eval_split, eval_seconds=round(time.monotonic() - start, 2), **extra,
                       config=config.to_dict())
    _print(f"\nheld-out evaluation: {config.name}, {config.eval_split} split, {result.num_episodes} episodes, "
           f"95% confidence interval ({result.info['eval_seconds']:.0f} s)")
    _print(result.table())
    target = out or (logdir / "eval.json" if logdir is not None else None)
    if target is not None:
        result.write_json(target)
        _print(f"results: {target}")
    if logdir is not None and (logdir / "metrics.jsonl").is_file():
        png = plot_learning_curve(logdir / "metrics.jsonl", logdir / "learning_curve.png", title=config.name)
        _print(f"learning curve: {png}")
    _print("RESULT " + result.summary())
    return result


def cmd_train(args) -> int:
    torch = _setup_torch(args)
    from .distributed import DistributedContext, DistributedError
    from .presets import build_learner, build_source
    from .trainer import CheckpointError, CheckpointWriteError, NonFiniteLossError, Trainer, read_latest_checkpoint

    config = effective_config(config_from_args(args))
    _check_backend(config)
    device = _resolve_device(torch, args.device)
    logdir = Path(args.logdir or Path("runs") / config.name)
    resume_from = None
    if args.resume:
        try:  # checkpoint.pt, else (with a warning) checkpoint.prev.pt; the Trainer continues from it
            resume_from = read_latest_checkpoint(logdir)
        except CheckpointError as error:
            raise CLIError(str(error)) from None
    if resume_from is not None:
        path, checkpoint = resume_from
        stored = checkpoint.get("config") or {}
        differ = [f for f in _STRUCTURAL if f in stored and stored[f] != getattr(config, f)]
        if differ:
            raise CLIError(f"{path} is from a different experiment ("
                           + ", ".join(f"{f}: {stored[f]!r} there, {getattr(config, f)!r} here" for f in differ)
                           + "); use another --logdir, or --no-resume to start over there")
    ctx = DistributedContext.from_environment(device=device)
    device = ctx.device
    if args.cuda_graph == "on" and torch.device(device).type != "cuda":
        raise CLIError(f"--cuda-graph on captures CUDA graphs but training runs on {device}: use --cuda-graph auto "
                       "or off there")
    try:
        train_source = build_source(config, "train", device)
        val_source = build_source(config, "val" if config.datasource != "sinusoid" else "test", device) \
            if args.val_every and ctx.is_main else None
        learner = build_learner(config, device)
        time_limit = None if args.time_limit is None else args.time_limit * 60
        trainer = Trainer(learner, train_source, iterations=config.iterations,
                          pretrain_iterations=config.pretrain_iterations, meta_lr=config.meta_lr, cosine=config.cosine,
                          min_lr_ratio=config.min_lr_ratio, clip_value=config.clip_value, clip_norm=config.clip_norm,
                          logdir=logdir, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                          keep_checkpoints=args.keep_checkpoints, max_bad_steps=args.max_bad_steps,
                          time_limit=time_limit, resume=False, progress=args.progress, log=args.log,
                          distributed=ctx, config=config.to_dict(), val_source=val_source, val_every=args.val_every,
                          val_episodes=args.val_episodes, val_seed=args.eval_seed, cuda_graph=args.cuda_graph)
        if resume_from is not None:
            trainer.load_checkpoint(*resume_from)
        trainer.check_same_iteration()
        if ctx.is_main:
            resumed = f", resumed at iteration {trainer.iteration}" if trainer.iteration else ""
            _print(f"maml-fast train: {config.name} ({config.description or config.datasource}) on {device}, "
                   f"backend {_backend_label(config.backend, device)}, {torch.get_num_threads()} CPU threads"
                   + (f", {ctx.world_size} processes" if ctx.active else "") + f"; logdir {logdir}{resumed}; "
                   f"meta-step: {trainer.graph_reason}")
        try:
            summary = trainer.train()
        except (NonFiniteLossError, CheckpointWriteError, DistributedError) as error:
            raise CLIError(str(error)) from None
        finally:
            trainer.close()
        if ctx.is_main:
            _print(f"trained {summary.iteration} iterations ({summary.iterations_run} now, {summary.stopped}) in "
                   f"{summary.wall_s:.1f} s: {summary.steps_per_s:.2f} meta-steps/s, {summary.skipped_steps} skipped; "
                   f"checkpoint {summary.checkpoint}")
            if args.final_eval:
                _evaluate_and_report(learner, config, device, logdir, args, extra={
                    "iterations": summary.iteration, "stopped": summary.stopped, "train_seconds": summary.wall_s,
                    "meta_steps_per_s": summary.steps_per_s, "checkpoint": str(summary.checkpoint)},
                    graphs=trainer.graphed_eval)
    finally:
        ctx.shutdown()
    return 0


def cmd_eval(args) -> int:
    torch = _setup_torch(args)
    from .presets import build_learner
    from .trainer import CHECKPOINT_NAME, CheckpointError, load_checkpoint, read_latest_checkpoint

    if args.checkpoint is not None:
        path = Path(args.checkpoint)
    elif args.logdir is not None:
        name = CHECKPOINT_NAME if args.test_iter is None else f"checkpoint_{args.test_iter:07d}.pt"
        path = Path(args.logdir) / name
    else:
        raise CLIError("eval needs --logdir (a train logdir) or --checkpoint (a checkpoint file)")
    try:
        if args.checkpoint is None and args.test_iter is None:
            # the logdir's newest checkpoint that loads: checkpoint.pt, else (warning) checkpoint.prev.pt
            found = read_latest_checkpoint(path.parent, resume_flag="maml-fast train --no-resume")
            if found is None:
                raise CLIError(f"checkpoint {path} does not exist")
            path, checkpoint = found
        elif not path.is_file():
            raise CLIError(f"checkpoint {path} does not exist" + (
                " (--test-iter needs checkpoints kept with train --keep-checkpoints)" if args.test_iter else ""))
        else:
            checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CLIError(str(error)) from None
    if not checkpoint.get("config"):
        raise CLIError(f"{path} holds no experiment config (it was not written by maml-fast train)")
    given = vars(args)
    changes = {_CONFIG_OPTIONS[o]: given[o] for o in _EVAL_OPTIONS if o in given}
    if "test_set" in given:
        changes["eval_split"] = "test" if given["test_set"] else "val"
    try:
        config = ExperimentConfig.from_dict(checkpoint["config"]).replace(**changes)
    except ValueError as error:
        raise CLIError(str(error)) from None
    _check_backend(config)
    device = _resolve_device(torch, args.device)
    from .evaluation import GraphedEvaluation
    from .trainer import graph_mode
    try:
        graphed, graph_reason = graph_mode(args.cuda_graph, torch.device(device))
    except ValueError as error:
        raise CLIError(str(error)) from None
    learner = build_learner(config, device)
    learner.load_state_dict(checkpoint["learner"])
    _print(f"maml-fast eval: {path} (iteration {checkpoint['iteration']}) on {device}; adapt + predict: {graph_reason}")
    out = Path(args.out) if args.out else path.parent / f"eval_{path.stem}_{config.eval_split}.json"
    _evaluate_and_report(learner, config, device, None, args, extra={
        "iterations": checkpoint["iteration"], "checkpoint": str(path)}, out=out,
        graphs=GraphedEvaluation(learner) if graphed else None)
    return 0


def cmd_bench(args) -> int:
    torch = _setup_torch(args)
    from . import backends
    from .presets import build_learner
    from .task_batch import TaskBatch

    config = config_from_args(args)
    device = _resolve_device(torch, args.device)
    for name in args.backends:
        if name != "auto" and name not in backends.backend_names():
            raise CLIError(f"--backends: unknown backend {name!r}; known: {', '.join(backends.backend_names())}")
    generator = torch.Generator().manual_seed(0)
    dtype = config.torch_dtype
    tasks = config.meta_batch_size
    if config.classification:
        shape = (1, 28, 28) if config.datasource == "omniglot" else (3, 84, 84)

        def split(per_class):
            x = torch.rand(tasks, config.ways * per_class, *shape, generator=generator, dtype=dtype)
            y = torch.arange(config.ways).repeat_interleave(per_class).expand(tasks, -1).contiguous()
            return x.to(device), y.to(device)
        batch = TaskBatch(*split(config.shots), *split(config.queries))
    else:
        width = 3 if config.baseline == "oracle" else 1
        xs = [torch.rand(tasks, n, width, generator=generator, dtype=dtype).to(device) for n in (config.shots, config.queries)]
        batch = TaskBatch(xs[0], torch.sin(xs[0][..., :1]), xs[1], torch.sin(xs[1][..., :1]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _print(f"maml-fast bench: {config.name}, {tasks} tasks, {config.inner_steps} inner steps, "
           f"{'first' if config.first_order else 'second'} order, {device}, {torch.get_num_threads()} threads")
    _print("| backend | ms / meta-step | meta-steps/s | speed-up vs first |")
    _print("|---|---|---|---|")
    first = None
    for name in args.backends:
        learner = build_learner(config.replace(backend=name), device)
        optimizer = torch.optim.Adam(learner.parameters(), config.meta_lr)

        def step():
            optimizer.zero_grad(set_to_none=True)
            learner(batch).loss.backward()
            optimizer.step()
        for _ in range(args.warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        first = first or seconds
        _print(f"| {name} | {1000 * seconds:.1f} | {1 / seconds:.2f} | {first / seconds:.2f}x |")
    return 0


def cmd_presets(args) -> int:
    for name, config in PRESETS.items():
        _print(f"{name:20s} {config.description}")
        _print(f"{'':20s} ways={config.ways} shots={config.shots} queries={config.queries} "
               f"meta_batch_size={config.meta_batch_size} inner_steps={config.inner_steps} inner_lr={config.inner_lr} "
               f"eval_inner_steps={config.eval_inner_steps} iterations={config.iterations} hidden={config.hidden}")
    return 0


_CHILD_ENV = "MAML_FAST_CLI_REEXECUTED"


def _reexec_with_passive_openmp(args) -> None:
    """Run the command again in a fresh interpreter with ``OMP_WAIT_POLICY=PASSIVE`` (once, and only
    when the variable is unset). OpenMP reads it when torch loads, which has happened by now. With
    the default (spinning) policy, torch's CPU threads burn their time slices waiting whenever
    another process shares the cores, and meta-steps run up to 20x slower on a busy machine."""
    if args.command not in ("train", "eval", "bench") or "OMP_WAIT_POLICY" in os.environ \
            or os.environ.get(_CHILD_ENV):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{_CHILD_ENV: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "maml_fast", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    """The console script. With ``argv=None`` (a real command line) train/eval/bench re-execute
    once with ``OMP_WAIT_POLICY=PASSIVE`` unless that variable is set (see the help text)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        _reexec_with_passive_openmp(args)
    commands = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "presets": cmd_presets}
    try:
        return commands[args.command](args)
    except CLIError as error:
        parser.exit(2, f"maml-fast {args.command}: error: {error}\n")
    except FileNotFoundError as error:  # missing data: the message names the path
        parser.exit(2, f"maml-fast {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\nmaml-fast: interrupted; the last checkpoint is intact (resume with the same command)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
