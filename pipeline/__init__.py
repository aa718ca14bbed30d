"""Stage 2 and the command glue: the training core (config, tasks, features, samplers, engine, train,
evaluate, metrics, checkpoint, run log) here, one module per other command in pipeline/commands/."""
