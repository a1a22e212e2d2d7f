"""Comparing runs: sweeps as MLflow child runs, and the paired comparison over seeds.

    sweep_spec.load_spec / expand          a sweep YAML -> grid cells and their command lines
    sweep.run_sweep / main                 run the cells as child runs (`python -m infoprompt_ds.compare.sweep`)
    runs.*                                 read runs from MLflow (a sweep's, an experiment's)
    stats.*                                paired differences, t-tests, intervals
    plots.* / report.*                     figures and the text report
    cli.main                               `python -m infoprompt_ds.compare`
"""
