"""The tree itself: topologies, the Ray actor tree, the virtual clock, the CLI."""
