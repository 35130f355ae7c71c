"""Test suite of the allocator."""
