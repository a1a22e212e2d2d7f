"""MLflow tracking: the client (rank 0), its outbox, the store, run names/tags/params, the pyfunc model.

    client.Tracker                         start/resume a run, log params, metrics, artifacts; `infoprompt mlflow`
    outbox.*                               a queue on disk that outlives a tracking-server outage
    store.default_store(...)               where the default sqlite store lives
    run_metadata.run_name_for / run_tags   what a run is called and tagged
    mlflow_model.*                         the export as an MLflow pyfunc model
"""
