"""The DeepSpeed training loop: one loop for every task, method and launcher (deepspeed, torchrun, srun,
plain python), as plain functions over one `Run`:

    run(cfg) = finish(fit(setup(cfg)))
    setup(cfg) -> Run         checks (prepare.py), process group, engine, resume, tracking
    fit(run)                  the loop: train_step, then log / validate / save / stop on step boundaries
    train_step(run, batch, micro) -> StepOut    one micro-batch: forward, agree on finiteness, backward, step
    validate(run, split)      metrics of the current weights on a split (all ranks)
    save(run, step)           a DeepSpeed checkpoint for exact resume
    finish(run) -> result     export, test metrics, metrics.json

Data flows one way: config → data → model → loss → engine step → tracking/checkpoint.
Import this module only after env.setup_environment() ran (it imports torch and DeepSpeed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from infoprompt_ds.runtime.checkpoint import (checkpoint_root, complete_checkpoints, load_export, save_checkpoint, save_export)
from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.runtime.distributed import (all_max_int, all_min, gather_trainable, no_grad_pass, retrace_zero3, set_trainable, to_device, train_batches)
from infoprompt_ds.env import setup_environment  # noqa: F401  (re-exported: callers that imported it from here)
from infoprompt_ds.errors import EXIT_DIVERGED, EXIT_PREEMPTED, StopRequested, TrainingDiverged  # noqa: F401 (re-exported)
from infoprompt_ds.io import write_json_atomic
from infoprompt_ds.metrics import compute_metrics
from infoprompt_ds.method.model import model_inputs
from infoprompt_ds.data.tasks import Task
from infoprompt_ds.runtime.selection import Candidate, better, single_class
from infoprompt_ds.runtime.preflight import offload_fault
from infoprompt_ds.runtime.unprompted_cache import compute_unprompted
from infoprompt_ds.runtime.setup import Run, setup

MI_TERMS = ("head", "repr", "kl")  # the InfoPrompt terms the model returns besides loss and ce


# --- the run object --------------------------------------------------------------------------------------

@dataclass
class StepOut:
    """One micro-batch through train_step."""
    finite: bool            # the loss was finite on every rank; if not: no backward, no update
    loss: float
    ce: float
    terms: dict[str, float]  # MI_TERMS (0.0 when the method has none)
    examples: int
    tokens: int             # real (attention-mask) tokens
    boundary: bool = False  # this micro-batch ended an optimizer step (gradient accumulation boundary)
    applied: bool = False   # ... and DeepSpeed applied the update (False: its gradient norm was NaN/inf)
    positions: int = 0      # input positions, padding included (train/padding_frac = 1 - tokens / positions)


@dataclass
class Window:
    """Sums over the finite micro-batches since the last log line; all-reduced over ranks when logged."""
    loss: float = 0.0
    ce: float = 0.0
    terms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MI_TERMS, 0.0))
    micro: int = 0
    examples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)  # throughput clock (eval/save time excluded)
    positions: int = 0

    def add(self, out: StepOut) -> None:
        self.loss += out.loss
        self.ce += out.ce
        for k in MI_TERMS:
            self.terms[k] += out.terms[k]
        self.micro, self.examples, self.tokens = self.micro + 1, self.examples + out.examples, self.tokens + out.tokens
        self.positions += out.positions

    def reduce(self) -> "Window":
        """Sums over every rank (a collective): global means and global throughput."""
        t = torch.tensor([self.loss, self.ce, *self.terms.values(), self.micro, self.examples, self.tokens,
                          self.positions], dtype=torch.float64)
        dist.all_reduce(t)
        loss, ce, *terms, micro, examples, tokens, positions = t.tolist()
        return Window(loss, ce, dict(zip(MI_TERMS, terms)), micro, examples, tokens, self.started, positions)


# --- one step ------------------------------------------------------------------------------------------

def batch_at(run: Run, micro: int, cache: dict[int, list]) -> dict:
    """The micro-batch number `micro` of this rank: the data stream is a pure function of it (exact resume)."""
    epoch, pos = divmod(micro, run.micro_per_epoch)
    train = run.data.splits["train"]
    if epoch not in cache:
        cache.clear()
        cache[epoch] = train_batches(train, run.cfg.per_device_train_batch_size, run.world, run.rank, run.cfg.seed,
                                     epoch, run.cfg.group_by_length)
    return to_device(run.collate([train[i] for i in cache[epoch][pos]]), run.device)


def mi_inputs(run: Run, batch: dict, micro: int) -> dict[str, Any]:
    """The InfoPrompt terms' extra inputs: noise, the decaying MI weight, cached z(x, no prompt)."""
    # The cached z goes to every model that reads it, vanilla instance prompts included: without it the
    # model runs a second (no-grad) backbone pass per step (it did: 1.4-1.6x a static step).
    cached = {"z_unprompted": run.z_cache[batch["idx"]]} if run.z_cache is not None else {}
    if not run.engine.module.needs_noise:
        return cached
    cfg = run.cfg
    # Noise from a generator keyed by (seed, micro-step, rank): the same after a resume.
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed * 1_000_003 + micro * run.world + run.rank)
    b = batch["input_ids"].shape[0]
    epochs_total = run.total_steps * cfg.gradient_accumulation_steps / run.micro_per_epoch
    kwargs = {"eps_pos": torch.randn(b, cfg.bottleneck_dim, generator=gen, device=run.device),
              "eps_neg": torch.randn(b, cfg.k_negatives, cfg.bottleneck_dim, generator=gen, device=run.device),
              "mi_scale": 1.0 - cfg.mi_decay * (micro // run.micro_per_epoch) / epochs_total}
    return kwargs | cached


def train_step(run: Run, batch: dict, micro: int) -> StepOut:
    """Forward one micro-batch (number `micro`), then backward + engine.step() unless the loss is NaN/inf
    on any rank: then every rank skips it (they must agree, or ZeRO's collectives would deadlock)."""
    engine = run.engine
    result = engine(**model_inputs(batch), labels=batch["labels"], **mi_inputs(run, batch, micro))
    if not all_min(run.guard.ok(result["loss"].item())):
        retrace_zero3(engine)  # this forward had no backward: start a fresh ZeRO-3 fetch trace
        return StepOut(False, result["loss"].item(), float("nan"), dict.fromkeys(MI_TERMS, 0.0), 0, 0)
    logging = (micro + 1) % run.cfg.gradient_accumulation_steps == 0 and (
        (run.step + 1) % run.cfg.logging_steps == 0 or run.step + 1 == run.total_steps)
    if logging:
        run.diag.grad_ratios(result)  # the terms' gradients on the prompt, on logging steps only
    engine.backward(result["loss"])
    run.diag.add(result)
    before = engine.global_steps
    engine.step()
    boundary = engine.global_steps != before
    if logging and run.diag.saturation:
        p0_pass(run, batch, micro)
    return StepOut(True, result["loss"].item(), result["ce"].item(),
                   {k: result[k].item() if k in result else 0.0 for k in MI_TERMS},
                   batch["input_ids"].shape[0], int(batch["attention_mask"].sum().item()),
                   boundary=boundary, applied=boundary and engine.was_step_applied(),
                   positions=batch["attention_mask"].numel())


def p0_pass(run: Run, batch: dict, micro: int) -> None:
    """The saturation diagnostic's one no-grad forward per logging window: this micro-batch, its noise, the
    initial prompt P0 and the estimators just updated (method.Diagnostics.add_p0). Every rank runs it on the
    same steps (ZeRO-3 gathers in it); it is a different pass from the step's, so ZeRO-3 retraces around it."""
    retrace_zero3(run.engine)
    with torch.no_grad():
        result = run.engine(**model_inputs(batch), labels=batch["labels"], **mi_inputs(run, batch, micro), at_p0=True)
    retrace_zero3(run.engine)
    run.diag.add_p0(result)


def count_nonfinite(run: Run, what: str, step: int) -> None:
    run.nonfinite_total += 1
    run.nonfinite_row += 1
    run.tracker.log_metrics({"train/nonfinite_steps": float(run.nonfinite_total)}, step)
    if run.rank == 0:
        tqdm.write(f"[nonfinite] {what} at optimizer step {step}: skipped "
                   f"({run.nonfinite_row} in a row, {run.nonfinite_total} in total)")
    if run.nonfinite_row >= run.cfg.max_nonfinite_steps:
        done = complete_checkpoints(checkpoint_root(run.cfg.output_dir))
        if run.bar is not None:
            run.bar.close()  # the error line must not land on the progress bar's line
        raise TrainingDiverged(
            f"training diverged: {run.nonfinite_row} non-finite or exploded steps in a row (last: {what} at optimizer "
            f"step {step}; max_nonfinite_steps={run.cfg.max_nonfinite_steps}); last good checkpoint: "
            f"{done[-1] if done else 'none'}; lower learning_rate or check the data, then resume with "
            f"--resume_from_checkpoint latest")


def log_window(run: Run, window: Window, micro: int) -> None:
    """Global means of the window over ranks and micro-batches, and throughput; one line to the tracker."""
    w = window.reduce()
    elapsed = time.perf_counter() - w.started
    logs = {"train/loss": w.loss / w.micro, "train/ce": w.ce / w.micro, "train/lr": run.engine.get_lr()[0],
            "train/samples_per_s": w.examples / elapsed, "train/tokens_per_s": w.tokens / elapsed,
            "train/epoch": micro / run.micro_per_epoch,
            "train/padding_frac": 1.0 - w.tokens / w.positions if w.positions else 0.0}  # of the input positions
    if run.has_mi:
        logs.update({f"train/{k}": w.terms[k] / w.micro for k in MI_TERMS})
    logs = {k: float(v) for k, v in {**logs, **run.diag.flush()}.items()}
    run.diag.warn(logs, run.rank)
    run.tracker.log_metrics(logs, run.step)
    run.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", samples_s=f"{logs['train/samples_per_s']:.1f}")


# --- evaluation and checkpoints ------------------------------------------------------------------------------

def predictions(engine, split, collate, cfg: TrainConfig, world: int, rank: int, task: Task, device) -> tuple[list, list]:
    """(predictions, labels) of every example of a split, in no fixed order (all ranks; collective)."""
    def rows_of(batch):
        preds, labels = engine(**model_inputs(batch))["logits"].argmax(-1), batch["labels"]
        if task.type == "ner":  # one tag per word: the positions the loss does not ignore
            keep = labels != -100
            return [(i, p[k].tolist(), y[k].tolist()) for i, p, y, k in zip(batch["idx"].tolist(), preds, labels, keep)]
        return list(zip(batch["idx"].tolist(), preds.tolist(), labels.tolist()))

    rows = no_grad_pass(engine, split, collate, cfg.per_device_eval_batch_size, world, rank, device, rows_of,
                        extra=cfg.n_virtual_tokens)  # the prompt's positions count in the eval batch's budget
    by_idx = {i: (p, y) for i, p, y in rows}  # drops the sampler's padding duplicates
    preds, labels = zip(*by_idx.values())
    return list(preds), list(labels)


def metrics_of(task: Task, cfg: TrainConfig, preds: list, labels: list) -> dict:
    return compute_metrics(task.type, preds, labels, list(task.labels), task.no_relation_label, cfg.strict_bio)


def evaluate(engine, split, collate, cfg: TrainConfig, world: int, rank: int, task: Task, device) -> dict:
    return metrics_of(task, cfg, *predictions(engine, split, collate, cfg, world, rank, task, device))


def validate(run: Run, split: str = "validation") -> dict[str, float]:
    """Metrics of the current weights on a split. Collective."""
    return evaluate(run.engine, run.data.splits[split], run.collate, run.cfg, run.world, run.rank,
                    run.data.task, run.device)


def validate_and_track(run: Run, step: int) -> dict[str, float]:
    """Validation metrics to the tracker; a new best (selection.better: never a single-class predictor over
    one that is not, ties to the earlier step) is exported to output_dir/best."""
    task = run.data.task
    metric = task.metric
    split = run.data.splits["validation"]
    started = time.perf_counter()
    preds, labels = predictions(run.engine, split, run.collate, run.cfg, run.world, run.rank, task, run.device)
    seconds = time.perf_counter() - started  # the whole pass: batches, forward, gathering the predictions
    metrics = metrics_of(task, run.cfg, preds, labels)
    # eval/examples_per_s: the pass's throughput (issue 37 item 6), not a metric of the weights
    run.tracker.log_metrics({**{f"eval/{k}": v for k, v in metrics.items()},
                             "eval/examples_per_s": len(split) / max(seconds, 1e-9)}, step)
    new = Candidate(step, metrics[metric], single_class(preds))
    best = Candidate(run.best_step, run.best_metric, run.best_single_class) if run.best_step is not None else None
    if better(new, best, explicit_accuracy=run.cfg.metric_for_best_model == "accuracy"):
        run.best_metric, run.best_step, run.best_single_class = new.value, step, new.single_class
        tensors = gather_trainable(run.engine)
        if run.rank == 0:
            save_export(run.out / "best", tensors, {**run.export_meta, "step": step, metric: new.value})
    if run.rank == 0:
        tqdm.write(f"[eval step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                   + (" (one class predicted for every example)" if new.single_class else "")
                   + f" (best {metric}={run.best_metric:.4f} @ {run.best_step})")
    return metrics


def save(run: Run, step: int) -> None:
    """A DeepSpeed checkpoint of step `step` (collective); its client state is what a resume restores."""
    save_checkpoint(run.engine, run.cfg.output_dir, step, {
        "global_step": step, "mlflow_run_id": run.tracker.run_id, "best_metric": run.best_metric,
        "best_step": run.best_step, "best_single_class": run.best_single_class,
        "nonfinite_steps": run.nonfinite_total}, run.cfg.save_total_limit, run.rank, run.identity)


def stop_if_asked(run: Run, step: int) -> None:
    """Every rank must agree to stop at the same step, or the checkpoint save would deadlock."""
    signum = all_max_int(run.stop.signum)
    if signum and step < run.total_steps:
        if not (run.cfg.save_steps and step % run.cfg.save_steps == 0):
            save(run, step)
        if run.rank == 0:
            tqdm.write(f"[stop] signal {signum} at step {step}: checkpoint saved, exiting "
                       f"with code {EXIT_PREEMPTED}; resume with --resume_from_checkpoint latest")
        raise StopRequested()


# --- the loop --------------------------------------------------------------------------------------------

def unprompted_pass(run: Run) -> torch.Tensor:
    """z(x, no prompt) for the training split (collective: every rank calls it), and the z statistics set
    from it: estimator=normalized standardises z with them, and predict applies the same from the meta."""
    z = compute_unprompted(run.engine, run.data.splits["train"], run.collate, run.cfg, run.world, run.rank,
                           run.device, run.tokenizer, run.tracker, run.start_step)
    run.engine.module.set_z_stats(z)
    run.export_meta["z_stats"] = run.engine.module.z_stats_meta()
    return z


def fit(run: Run) -> Run:
    cfg, engine = run.cfg, run.engine
    if run.params is not None:
        run.tracker.log_params(run.params)
        run.tracker.log_artifact(run.out / "ds_config.json")
    if engine.module.needs_unprompted:  # the estimators, the VIB's KL, or the z statistics need it
        z = unprompted_pass(run)
        run.z_cache = z if cfg.cache_unprompted else None
    if cfg.eval_on_start and run.start_step == 0:  # a fresh run: the untrained model is a candidate too
        validate_and_track(run, 0)
    micro = run.start_step * cfg.gradient_accumulation_steps  # micro-batches consumed so far
    window, epoch_cache = Window(), {}
    run.bar = tqdm(total=run.total_steps, initial=run.start_step, disable=run.rank != 0, desc="train",
                   dynamic_ncols=True)
    engine.train()
    while run.step < run.total_steps:
        out = train_step(run, batch_at(run, micro, epoch_cache), micro)
        micro += 1  # a skipped micro-batch still moves the data stream on
        if not out.finite:
            count_nonfinite(run, f"loss={out.loss}", run.step)
            continue
        window.add(out)
        if not out.boundary:
            continue
        step = run.step
        if out.applied:
            run.nonfinite_row = 0
        elif not cfg.fp16:  # fp16: the loss scaler's overflow skips are routine, it handles them itself
            count_nonfinite(run, "gradient norm=inf/nan", step)  # DeepSpeed skipped the update
        run.bar.update(1)
        if step % cfg.logging_steps == 0 or step == run.total_steps:
            log_window(run, window, micro)
            window = Window()
        paused = time.perf_counter()  # throughput counts training only, not eval/checkpoint time
        if step % cfg.eval_steps == 0 or step == run.total_steps:
            validate_and_track(run, step)
        if ((cfg.save_steps and step % cfg.save_steps == 0) or step == run.total_steps) and not run.nonfinite_row:
            save(run, step)
        window.started += time.perf_counter() - paused
        stop_if_asked(run, step)
    run.bar.close()
    return run


def finish(run: Run) -> dict[str, Any]:
    """Export the last weights, evaluate on test (the best weights if load_best_model_at_end), and write
    metrics.json last: its presence means "finished"."""
    cfg, out = run.cfg, run.out
    final = gather_trainable(run.engine)
    if run.rank == 0:
        save_export(out / "export", final, {**run.export_meta, "step": run.step})
    if cfg.load_best_model_at_end and run.best_step is not None and (out / "best").is_dir():
        set_trainable(run.engine, load_export(out / "best")[0])
    test_metrics = validate(run, "test")
    run.tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, run.step)
    result = {"global_step": run.step, "best_step": run.best_step,
              f"best_validation_{run.data.task.metric}": run.best_metric,
              "test": test_metrics, "test_weights": "best" if cfg.load_best_model_at_end else "last",
              "mlflow_run_id": run.tracker.run_id, "world_size": run.world,
              "best_is_untrained": run.best_step == 0}  # step 0 won: training never beat the initial model
    if run.rank == 0:
        if run.best_step == 0:
            print(f"[best] step 0: training did not beat the untrained model on validation "
                  f"({run.data.task.metric}={run.best_metric:.4f}); best/ holds the initial prompt", flush=True)
        print("[test] " + " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()), flush=True)
        run.tracker.log_artifact(out / "export", "export")
        run.tracker.log_best(out, result, cfg.model_name_or_path, run.data.task.type)
        write_json_atomic(out / "metrics.json", result)
        run.tracker.log_artifact(out / "metrics.json")
    run.status = "FINISHED"
    return result


def _say_why(r: Run, e: Exception) -> None:
    if r.bar is not None:
        r.bar.close()  # the error line must not land on the progress bar's line
    r.tracker.set_tags({"infoprompt.error": str(e)[:5000]})


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole training: setup -> fit -> finish; the tracking run ends with the outcome's status."""
    r = setup(cfg)
    try:
        return finish(fit(r))
    except (KeyboardInterrupt, StopRequested):
        r.status = "KILLED"  # resumable: the checkpoint holds the MLflow run id, a resume reopens it
        raise
    except (ConfigError, TrainingDiverged) as e:  # the one line the user sees, on the FAILED run too
        _say_why(r, e)
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless the swap folder explains it
        fault = offload_fault(cfg, e)  # the NVMe swap folder vanished or filled up: a clear line, not a traceback
        if fault is None:
            raise
        _say_why(r, fault)
        raise fault from e
    finally:
        r.tracker.end(r.status)
