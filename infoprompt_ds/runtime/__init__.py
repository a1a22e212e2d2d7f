"""Running a training: checks, DeepSpeed, the loop, checkpoints, exports and the output folder.

    prepare.prepare(cfg) -> Prepared       every weight-free check (preflight.*) and the data, in seconds
    setup.setup(cfg) -> Run                process group, output folder, model + engine, resume, tracking
    train_loop.run(cfg)                    finish(fit(setup(cfg))): the one loop for every task and launcher
    ds_config.*                            the DeepSpeed json: shipped configs, "auto" fill, checks
    distributed.* / process_group.*        per-rank batches, no-grad passes, gathering trainables; the group
    unprompted_cache.compute_unprompted    z(x, no prompt) once per run, cached on disk across runs
    checkpoint.save_checkpoint / save_export   DeepSpeed checkpoints and atomic exports
    peft_export.save_peft_adapter          the export's prompt as a PEFT prompt-tuning adapter
    outdir.*                               the output folder's lock and ownership
    loss_guard.LossGuard                   a non-finite or exploded loss -> stop with the last good checkpoint
"""
