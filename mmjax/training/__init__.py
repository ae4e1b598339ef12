"""The training side: trainable groups and optimizer, state and the jitted step."""
