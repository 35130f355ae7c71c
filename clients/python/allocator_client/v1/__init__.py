"""Stubs generated from proto/allocator/v1/allocator.proto by allocator_client.codegen.

Do not edit: run `make proto` (python -m allocator_client.codegen).
"""
