"""Training flows: distillation and QAT (distill), gradual / movement pruning (movement), structured
pruning (structured), recovery of a compressed causal LM (recover) and staged recipes that chain them
(staged). The public entry points are re-exported by ``sparseinfer``."""
