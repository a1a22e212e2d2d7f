"""InfoPrompt soft prompt tuning on a DeepSpeed ZeRO-3-sharded frozen backbone (see README.md)."""
