"""The toy world: procedural concepts, its classifier, the toy model's training and evaluation."""
