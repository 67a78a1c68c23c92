"""Dataset sidecars, their validation, the synthetic scene generator and the nerfstudio data glue."""
