"""foldtune pipeline: models, losses, training, prediction, scoring, reports and the CLI."""
