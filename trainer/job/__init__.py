"""The job and its bookkeeping: Ray (ray_cluster), DeepSpeed (ds_config, precision), checkpoints and
what they hold (checkpoint, trainable_state), stops (signals, failures), the console, GPUs and FLOPs."""
