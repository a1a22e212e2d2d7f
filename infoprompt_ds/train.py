"""`deepspeed --module infoprompt_ds.train --deepspeed zero3 [--key value ...]`: the training entry as a
module of the installed package (the repo-root `train.py` is the same entry as a file; `infoprompt-train`
the same as a console script). Also `python -m infoprompt_ds.train` and `torchrun -m infoprompt_ds.train`."""

from infoprompt_ds.cli import train_main

if __name__ == "__main__":
    train_main()
