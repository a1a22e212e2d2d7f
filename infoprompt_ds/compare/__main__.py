from infoprompt_ds.compare.cli import main

main()
