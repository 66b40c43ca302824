"""Training pipeline for DSA indexers: data, the Trainer subclass and the `dsa train` command."""
