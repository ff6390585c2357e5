"""medalign trainer: config schema, accelerator set-up, loop, checkpoints, evaluation, reports."""
