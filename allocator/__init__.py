"""Multi-armed bandit traffic allocator."""
