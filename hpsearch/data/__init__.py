"""Data: reading tables, their facts, tensors on a device, and memory estimates. No database."""
