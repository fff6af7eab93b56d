"""The data flywheel (issue 20): stored traffic -> a dataset (select, dedupe, relabel) -> a tuned adapter
-> an eval against what the alias serves -> a promotion. `dataset` and `relabel` make the training file."""
