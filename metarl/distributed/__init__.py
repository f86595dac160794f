"""The distributed run: the backend (Ray or one process), the fleet of task workers and the learner, one meta-iteration, the driver's loop (`metarl run`), stopping, logging."""
