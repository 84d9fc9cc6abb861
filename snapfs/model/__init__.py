"""The product's vocabulary: names and their rules, CopySnapshot parameters, clock."""
