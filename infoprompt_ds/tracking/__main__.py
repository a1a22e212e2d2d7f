from infoprompt_ds.tracking.client import main

main()
