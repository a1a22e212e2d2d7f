"""Entry point: `deepspeed train.py --deepspeed ds_configs/zero3.json [--key value ...]`.

Also runs under torchrun, srun, or as a plain `python train.py ...` (one process). See README.md.
"""

from infoprompt_ds.cli import train_main

if __name__ == "__main__":
    train_main()
