"""Static sparsity patterns (Compact Attention windows) that produce a BlockIndex."""
